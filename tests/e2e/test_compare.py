"""`rlrt compare` on the tiny model: 2 algorithms x 2 seeds x 3 steps, a killed pair and a Ctrl-C,
the rerun that finishes the comparison, its CSV / plot / summary, and a rerun's identical curve."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e_helpers import FAST, TIMING_PREFIXES, model_overrides

from rlrt_megatron.compare import stats
from rlrt_megatron.compare.report import pm, verdict

pytestmark = pytest.mark.e2e

OWNED = ("checkpoint.resume", "eval.every")  # set by compare / below


def _argv(tiny_model: dict, run_dir: Path, algorithms: str, seeds: str) -> list[str]:
    ov = [o for o in FAST if not o.startswith(OWNED)]
    return [
        sys.executable, "-m", "rlrt_megatron.cli", "compare",
        "--algorithms", algorithms, "--seeds", seeds, "--steps", "3", "--parallel", "1",
        "--run-dir", str(run_dir), *ov, "eval.every=3", "eval.k=2", *model_overrides(tiny_model),
    ]  # fmt: skip


def _env() -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _wait(cond, proc: subprocess.Popen, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"compare exited (rc {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _pid(pair_dir: Path) -> int | None:
    try:
        return int(json.loads((pair_dir / "compare_pair.json").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def _n_rows(pair_dir: Path) -> int:
    path = pair_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    return header, rows


@pytest.mark.slow  # the slow tier (make test-slow, run by .ci/run): keeps make test < 15 min
def test_compare_resume_outputs_and_rerun(tiny_model, tmp_path) -> None:
    run_dir = tmp_path / "cmp"
    log1 = open(tmp_path / "first.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        _argv(tiny_model, run_dir, "rlrt,grpo", "2"), env=_env(), stdout=log1, stderr=log1
    )
    # pairs run seed-major: rlrt 0, grpo 0, rlrt 1, grpo 1. Kill grpo 0's trainer as it starts.
    grpo0, rlrt1 = run_dir / "grpo" / "seed0", run_dir / "rlrt" / "seed1"
    _wait(lambda: _pid(grpo0) is not None, proc, "grpo seed 0 to start")
    os.kill(_pid(grpo0), signal.SIGKILL)
    # then Ctrl-C while rlrt seed 1 trains: it checkpoints at its next step and stops
    _wait(lambda: _n_rows(rlrt1) >= 1, proc, "rlrt seed 1's first step")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 1, (tmp_path / "first.log").read_text()[-4000:]
    first = (tmp_path / "first.log").read_text()
    assert "grpo seed 0: FAILED" in first and "rlrt seed 0: finished 3 steps" in first
    assert not (run_dir / "grpo" / "seed1").exists(), "no new pair after Ctrl-C"
    done0 = run_dir / "rlrt" / "seed0" / "compare_done.json"
    stamp = done0.stat().st_mtime_ns

    second = subprocess.run(
        _argv(tiny_model, run_dir, "rlrt,grpo", "2"), env=_env(), capture_output=True,
        text=True, timeout=900,
    )  # fmt: skip
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "already finished, kept: rlrt seed 0" in second.stdout
    assert done0.stat().st_mtime_ns == stamp, "a finished pair must not run again"
    for pair in ("grpo seed 0", "grpo seed 1"):
        assert f"{pair}: finished 3 steps" in second.stdout

    # CSV: one row per algorithm, seed and step; the metrics after the three key columns
    header, rows = _csv(run_dir / "compare.csv")
    assert header[:4] == ["algorithm", "seed", "step", "reward/mean"]
    keys = [(r["algorithm"], int(r["seed"]), int(r["step"])) for r in rows]
    assert keys == [(a, s, t) for s in (0, 1) for a in ("rlrt", "grpo") for t in (1, 2, 3)]
    ekey = "eval/average/avg@2"
    assert ekey in header and "delta/mean" in header
    for r in rows:  # eval only after the last step
        assert (r[ekey] != "") == (r["step"] == "3")
        assert 0.0 <= float(r["reward/mean"]) <= 1.0
    png = (run_dir / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # summary.md / summary.json against numbers recomputed from the CSV
    per = {}
    for (algo, seed), group in _groups(rows).items():
        per.setdefault(algo, {})[seed] = {
            "final_avg": [float(r[ekey]) for r in group if r[ekey]][-1],
            "reward_auc": stats.mean([float(r["reward/mean"]) for r in group]),
        }
    summary = json.loads((run_dir / "summary.json").read_text())
    md = (run_dir / "summary.md").read_text()
    for algo in ("rlrt", "grpo"):
        for m in ("final_avg", "reward_auc"):
            vals = [per[algo][s][m] for s in (0, 1)]
            got = summary["per_algorithm"][algo][m]
            assert got["values"] == pytest.approx(vals, abs=1e-12)
            assert got["mean"] == pytest.approx(stats.mean(vals), abs=1e-12)
            assert got["se"] == pytest.approx(stats.stderr(vals), abs=1e-12)
            assert pm(stats.mean(vals), stats.stderr(vals)) in md
    for m in ("final_avg", "reward_auc"):
        t = stats.paired_t_test(
            [per["rlrt"][s][m] for s in (0, 1)], [per["grpo"][s][m] for s in (0, 1)]
        ).__dict__
        assert summary["versus"]["grpo"][m]["mean_diff"] == pytest.approx(t["mean_diff"])
        assert verdict("rlrt", "grpo", t) in md
    # teacher diagnostics for RLRT (a teacher), not for GRPO
    assert "| rlrt | " in md.split("Teacher-side")[1] and "| grpo |" not in md.split("Teacher")[1]
    fr = [float(r["teacher/frac_rows"]) for r in rows if r["algorithm"] == "rlrt"]
    assert all(0.0 <= v <= 1.0 for v in fr) and math.isfinite(sum(fr))

    # the Ctrl-C'd rlrt seed 1 (resumed) and a fresh, uninterrupted rerun: identical curves
    again = subprocess.run(
        _argv(tiny_model, tmp_path / "again", "rlrt", "1,"), env=_env(), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    _, rerun = _csv(tmp_path / "again" / "compare.csv")
    ref = _groups(rows)[("rlrt", 1)]
    assert [_computed(r) for r in rerun] == [_computed(r) for r in ref]


def _groups(rows: list[dict[str, str]]) -> dict[tuple[str, int], list[dict[str, str]]]:
    out: dict[tuple[str, int], list[dict[str, str]]] = {}
    for r in rows:
        out.setdefault((r["algorithm"], int(r["seed"])), []).append(r)
    return out


def _computed(row: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in row.items() if v != "" and not k.startswith(TIMING_PREFIXES)}
