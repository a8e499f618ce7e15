"""GPU tier fixtures: a CUDA device (else the whole tier skips) and one warmed tiny model.

.venv/bin/python -m pytest -q -m gpu tests/gpu      # or tools/gpu_check.sh on a GPU machine
"""

from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gpu_tiny_model(tmp_path_factory) -> dict[str, str]:
    """{"hf": dir, "megatron": dir}: the tiny Qwen3, SFT-warmed on the GPU (100 steps)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from recipes import get_recipe
    from rlrt_megatron.trainer.cli import _prepare_demo_model

    root = tmp_path_factory.mktemp("gpu_tiny_model")
    cfg = get_recipe("tiny_demo", ["model.sft_warmup_steps=100"])
    _prepare_demo_model(cfg, str(root))
    return {"hf": os.path.join(root, "hf"), "megatron": os.path.join(root, "megatron")}
