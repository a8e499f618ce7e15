import json
import os
import sys

import pytest

# Make tests/ importable (dist_utils) and keep CPU tests single-threaded per process:
# the machines have 2 cores and distributed tests run several processes at once.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ---- the fault table (benchmarks/faults.py; tests/faults and tests/slurm) ----------------------
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
