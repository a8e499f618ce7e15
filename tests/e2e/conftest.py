"""The e2e fixtures: one SFT-warmed tiny model (+ its Megatron checkpoint) per test session."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> dict[str, str]:
    """{"hf": dir, "megatron": dir} of the warmed tiny model (built once per session)."""
    from recipes import get_recipe
    from rlrt_megatron.trainer.cli import _prepare_demo_model

    root = tmp_path_factory.mktemp("tiny_model")
    cfg = get_recipe("tiny_demo")  # the demo's warm-up (steps, teacher share)
    _prepare_demo_model(cfg, str(root))
    return {"hf": os.path.join(root, "hf"), "megatron": os.path.join(root, "megatron")}
