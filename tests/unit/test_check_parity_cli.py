"""tools/check_parity.py's verdict (issue 25 item 8): a default threshold, a line saying what is
acceptable, exit 1 above it (the parity run itself is tests/distributed/test_parity.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_tool():
    spec = importlib.util.spec_from_file_location(
        "check_parity", REPO / "tools" / "check_parity.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "diff, extra, rc, verdict",
    [(3e-5, [], 0, "PASS"), (0.7, [], 1, "FAIL"), (float("nan"), [], 1, "FAIL"),
     (0.05, ["--threshold", "0.1"], 0, "PASS")],
)  # fmt: skip
def test_default_threshold_and_verdict(monkeypatch, capsys, diff, extra, rc, verdict):
    tool = load_tool()
    assert tool.DEFAULT_THRESHOLD == 1e-2
    monkeypatch.setattr(tool, "run_parity", lambda *a, **k: diff)
    assert tool.main(["--hf", "h", "--ckpt", "c", *extra]) == rc
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith(f"{verdict}: max abs logit difference")
    assert "summation order" in lines[-2]
    assert lines[-1].startswith("max_abs_logit_diff=")
