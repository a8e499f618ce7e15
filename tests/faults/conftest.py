"""The faults tier reuses the e2e tier's helpers (tests/e2e) and its tiny model: built once per
session, or taken from `RLRT_TEST_TINY_MODEL` (a directory with `hf/` and `megatron/`, as
`benchmarks/faults.py` builds it) to skip the build."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "e2e"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> dict[str, str]:
    from recipes import get_recipe
    from rlrt_megatron.trainer.cli import _prepare_demo_model

    root = os.environ.get("RLRT_TEST_TINY_MODEL") or str(tmp_path_factory.mktemp("tiny_model"))
    _prepare_demo_model(get_recipe("tiny_demo", ["model.sft_warmup_steps=300"]), root)
    return {"hf": os.path.join(root, "hf"), "megatron": os.path.join(root, "megatron")}
