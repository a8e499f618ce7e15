"""The faults tier reuses the e2e tier's helpers (tests/e2e) and its tiny model: built once per
session, or taken from `RLRT_TEST_TINY_MODEL` (a directory with `hf/` and `megatron/`, as
`benchmarks/faults.py` builds it) to skip the build."""

from __future__ import annotations

import json
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


# ---- the fault table (benchmarks/faults.py) ------------------------------------------------
TABLE_ENV = "RLRT_FAULT_TABLE"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    rep = (yield).get_result()
    if rep.when == "call":
        item.fault_passed = rep.passed


@pytest.fixture
def fault_row(request):
    """`fault_row(case, where, expected)` -> a row dict the test fills in (`observed`, `exit`,
    `detect_s`, and `lost` = 0 once it has checked that nothing was lost). With
    `RLRT_FAULT_TABLE` set, the rows are appended there as json lines after the test, `survived`
    = the test passed."""
    rows: list[dict] = []

    def add(case: str, where: str, expected: str) -> dict:
        row = {"case": case, "where": where, "expected": expected, "observed": "",
               "exit": "", "detect_s": None, "lost": "?"}  # fmt: skip
        rows.append(row)
        return row

    yield add
    path = os.environ.get(TABLE_ENV)
    if path:
        passed = getattr(request.node, "fault_passed", False)
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps({**row, "survived": passed, "test": request.node.nodeid}) + "\n")
