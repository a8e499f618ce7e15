"""Asynchronous rollouts (rollout.async_steps=1, the local engine in its own process): one version
of staleness after the first step, and preemption during an async step resumes with the metrics
of the uninterrupted run (the sampled batch is checkpointed, the in-flight one regenerated)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from dist_utils import run_distributed
from e2e_helpers import (
    FAST,
    clean_env,
    computed,
    metrics_rows,
    model_overrides,
    sigterm_after_first_step,
    train_cmd,
)

pytestmark = pytest.mark.e2e

ASYNC = ["rollout.async_steps=1"]


def _cmd(tiny_model: dict, run_dir: str, *extra: str) -> list[str]:
    return train_cmd(tiny_model, run_dir, *ASYNC, *extra)


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    ref_dir = str(tmp_path_factory.mktemp("async_ref"))
    ref = subprocess.run(
        _cmd(tiny_model, ref_dir, "--resume", "none"),
        capture_output=True, text=True, timeout=600, env=clean_env(),
    )  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    return {r["step"]: r for r in metrics_rows(ref_dir)}


def test_async_run_is_one_version_behind(reference):
    assert sorted(reference) == [1, 2, 3, 4]
    assert reference[1]["rollout/staleness"] == 0.0  # both first batches use the initial weights
    for step in (2, 3, 4):
        assert reference[step]["rollout/staleness"] == 1.0
        assert reference[step]["rollout/version"] == step
    # the engine's score after each sync agreed with the trainer (fp32 both)
    for step in (1, 3, 4):
        assert reference[step]["rollout/sync_check_abs_diff"] < 1e-3
    assert all(r["time/rollout"] >= 0 for r in reference.values())


@pytest.mark.slow  # make test-slow (run by .ci/run): keeps make test < 15 min
def test_preempted_async_run_resumes_with_identical_metrics(tiny_model, tmp_path, reference):
    run_dir = str(tmp_path / "run")
    cmd = _cmd(tiny_model, run_dir, "--resume", "none")
    sigterm_after_first_step(cmd, run_dir, tmp_path / "first.err")  # batch 3 in flight
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        name = f.read().strip()
    stopped = int(name.split("_")[1])
    assert 1 <= stopped < 4, "the signal should stop the run before its last step"
    ckpt = os.path.join(run_dir, "checkpoints", name)
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        queue = json.load(f)["rollout_queue"]
    assert [b["step"] for b in queue["batches"]] == [
        s for s in (stopped + 1, stopped + 2) if s <= 4
    ]
    assert os.path.isfile(os.path.join(ckpt, "rollout_queue.pt"))

    resumed = subprocess.run(
        _cmd(tiny_model, run_dir, "--resume", "auto"),
        capture_output=True, text=True, timeout=600, env=clean_env(),
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = {r["step"]: computed(r) for r in metrics_rows(run_dir)}
    assert sorted(rows) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert rows[step] == computed(reference[step]), f"step {step} differs after resume"


def test_a_sync_checkpoint_cannot_resume_async(tiny_model, tmp_path):
    run_dir = str(tmp_path / "mixed")
    first = subprocess.run(
        _cmd(tiny_model, run_dir, "rollout.async_steps=0", "train.steps=1", "--resume", "none"),
        capture_output=True, text=True, timeout=600, env=clean_env(),
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run(
        _cmd(tiny_model, run_dir, "--resume", "auto"),
        capture_output=True, text=True, timeout=600, env=clean_env(),
    )  # fmt: skip
    assert again.returncode != 0 and "rollout.max_staleness=0" in again.stderr


def _tp2_async(rank: int, world: int, model: dict, run_dir: str) -> list[dict]:
    from recipes import get_recipe
    from rlrt_megatron.trainer.train import train

    cfg = get_recipe(
        "tiny_demo",
        [*FAST, *model_overrides(model), *ASYNC, "parallel.tp=2", "train.steps=3",
         f"logging.run_dir={run_dir}"],
    )  # fmt: skip
    return train(cfg)["metrics"]


@pytest.mark.distributed
def test_async_at_tp2(tiny_model, tmp_path):
    rows = run_distributed(_tp2_async, 2, tiny_model, str(tmp_path / "tp2"), timeout=900)[0]
    assert [r["rollout/staleness"] for r in rows] == [0.0, 1.0, 1.0]
    assert all(r["rollout/sync_check_abs_diff"] < 1e-3 for r in rows)
