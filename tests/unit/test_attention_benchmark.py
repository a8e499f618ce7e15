"""benchmarks/train_throughput.py runs end to end on CPU (tiny shape, one timed step): the hf
anchor rows and the local / torch Megatron rows train through the real code paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_train_throughput_cpu_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--shape", "tiny",
        "--seq", "48", "--device", "cpu", "--steps", "1", "--warmup", "1", "--json", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["case"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"hf", "hf-amp", "local", "torch"}, proc.stdout  # te rows skip without TE
    assert all(r["tokens_per_s"] > 0 for r in rows.values())
    assert "skipped, transformer_engine is not importable" in proc.stdout
    assert "vs hf" in proc.stdout
