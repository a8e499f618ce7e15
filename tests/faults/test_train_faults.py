"""Faults during `rlrt train` of the tiny model, each against one uninterrupted reference run:

- case 4, the disk fills up while a checkpoint is written (a real 2.8 MiB tmpfs as root, else an
  injected `OSError(ENOSPC)`): exit 4 naming "disk full" and the directory, `latest` still the
  previous checkpoint, no partial `iter_N.tmp` left; after freeing space, `--resume auto`
  finishes with the reference's metrics;
- case 7, NaN / Inf (`RLRT_FAULT_INJECT`): `train.on_nonfinite=stop` exits 5 naming the step and
  the tensor, writes no checkpoint of that step, and the resumed run equals the reference;
  `skip` skips the spoiled mini-batch's optimizer step and counts it;
- case 5 through the CLI: a damaged newest checkpoint is skipped with a warning naming the file
  and the run resumes from the one before, equal to the reference; none intact: exit 2.
"""

from __future__ import annotations

import contextlib
import os
import subprocess

import pytest
from e2e_helpers import clean_env, computed, metrics_rows, train_cmd

pytestmark = pytest.mark.faults

STEPS = 3


def _train(tiny_model, run_dir: str, *extra: str, env: dict | None = None):
    cmd = train_cmd(tiny_model, run_dir, f"train.steps={STEPS}", "checkpoint.save_every=1",
                    *extra)  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**clean_env(), **(env or {})})  # fmt: skip


def _rows(run_dir: str) -> dict[int, dict]:
    return {r["step"]: computed(r) for r in metrics_rows(run_dir)}


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> dict[int, dict]:
    run_dir = str(tmp_path_factory.mktemp("reference"))
    out = _train(tiny_model, run_dir, "--resume", "none")
    assert out.returncode == 0, out.stderr[-3000:]
    return _rows(run_dir)


def _latest(ckpt_dir) -> str:
    with open(os.path.join(ckpt_dir, "latest")) as f:
        return f.read().strip()


@contextlib.contextmanager
def _small_disk(path):
    """A 2.8 MiB tmpfs at `path` (one tiny checkpoint fits, two do not) and a function that
    grows it; None (nothing mounted) where mounting is not allowed."""
    os.makedirs(path)
    ok = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2800k", "tmpfs", str(path)], capture_output=True
    ).returncode == 0  # fmt: skip
    try:
        yield (lambda: subprocess.run(["mount", "-o", "remount,size=64m", str(path)], check=True)
               ) if ok else None  # fmt: skip
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_keeps_previous_checkpoint_and_resumes_exactly(
    tiny_model, tmp_path, reference, fault_row
):
    run_dir, ckpt = str(tmp_path / "run"), tmp_path / "disk" / "ckpt"
    with _small_disk(tmp_path / "disk") as grow:
        env = None if grow else {"RLRT_FAULT_INJECT": "enospc@2"}
        row = fault_row(
            "4 ENOSPC in a checkpoint write",
            "checkpoint of step 2 (" + ("2.8 MiB tmpfs" if grow else "injected OSError") + ")",
            "exit 4 'disk full' + dir; latest kept; resume exact",
        )
        out = _train(tiny_model, run_dir, f"checkpoint.dir={ckpt}", "--resume", "none", env=env)
        assert out.returncode == 4, out.stderr[-3000:]
        assert "disk full" in out.stderr and f"{ckpt}/iter_0000002.tmp" in out.stderr
        assert _latest(ckpt) == "iter_0000001"
        assert sorted(os.listdir(ckpt)) == ["iter_0000001", "latest"]  # the partial write gone
        row.update(exit=out.returncode, detect_s="at the write",
                   observed="disk full named, latest=iter_1, no partial dir")  # fmt: skip
        if grow:
            grow()  # the operator frees space
        out = _train(tiny_model, run_dir, f"checkpoint.dir={ckpt}", "--resume", "auto")
        assert out.returncode == 0, out.stderr[-3000:]
    assert _rows(run_dir) == reference
    row.update(lost=0, observed=row["observed"] + "; resumed: metrics = reference")


def test_nonfinite_stop_names_step_and_tensor_and_resumes_exactly(
    tiny_model, tmp_path, reference, fault_row
):
    run_dir = str(tmp_path / "run")
    row = fault_row("7 NaN gradient, on_nonfinite=stop", "update of step 2 (injected)",
                    "exit 5 naming step + tensor; no NaN checkpoint; resume exact")  # fmt: skip
    out = _train(tiny_model, run_dir, "train.on_nonfinite=stop", "--resume", "none",
                 env={"RLRT_FAULT_INJECT": "nan_grad@2"})  # fmt: skip
    assert out.returncode == 5, out.stderr[-3000:]
    assert "step 2: non-finite gradient of " in out.stderr
    ckpt = os.path.join(run_dir, "checkpoints")
    assert sorted(os.listdir(ckpt)) == ["iter_0000001", "latest"]  # no checkpoint of step 2
    named = out.stderr.split("non-finite ")[1].split(" (")[0]
    row.update(exit=5, detect_s="same step", observed=f"step 2: {named}; no iter_2")
    out = _train(tiny_model, run_dir, "--resume", "auto")
    assert out.returncode == 0, out.stderr[-3000:]
    assert _rows(run_dir) == reference
    row.update(lost=0, observed=row["observed"] + "; resumed: metrics = reference")
    row = fault_row("5 damaged checkpoint via rlrt train", "4 bytes of iter_3's shard",
                    "warning naming the file; resume from iter_2; metrics = reference")  # fmt: skip
    # case 5 through the CLI: damage the newest checkpoint, resume: the one before is used
    shard = os.path.join(ckpt, "iter_0000003", "dist", "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) // 2)
        f.write(b"\x00\x01\x02\x03")
    out = _train(tiny_model, run_dir, "--resume", "auto")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "iter_0000003 is damaged: dist/__0_0.distcp: sha256" in out.stderr
    assert "resuming from" in out.stderr and "iter_0000002, the newest intact" in out.stderr
    assert _rows(run_dir) == reference  # step 3 recomputed from iter_2, identical
    seen = "dist/__0_0.distcp named; fell back to iter_2; metrics = reference"
    row.update(exit=0, detect_s="at load", lost=0, observed=seen)
    row = fault_row("5 no intact checkpoint", "trainer_state.json of iter_2 and iter_3",
                    "exit 2, nothing loaded")  # fmt: skip
    # none intact: exit 2, nothing loaded
    for name in ("iter_0000002", "iter_0000003"):
        os.remove(os.path.join(ckpt, name, "trainer_state.json"))
        with open(os.path.join(ckpt, name, "trainer_state.json"), "w") as f:
            f.write("{")
    out = _train(tiny_model, run_dir, "--resume", "auto")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "no intact checkpoint to resume" in out.stderr
    row.update(exit=2, detect_s="at load", lost=0, observed="both named; exit 2, nothing trained")


def test_nonfinite_skip_counts_and_keeps_weights_finite(tiny_model, tmp_path, reference, fault_row):
    run_dir = str(tmp_path / "run")
    row = fault_row("7 Inf loss, on_nonfinite=skip", "update of step 2 (injected)",
                    "mini-batch skipped + counted; run continues; weights finite")  # fmt: skip
    out = _train(tiny_model, run_dir, "--resume", "none", env={"RLRT_FAULT_INJECT": "inf_loss@2"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = _rows(run_dir)
    assert rows[1] == reference[1]
    assert [rows[s]["train/nonfinite_skipped"] for s in (1, 2, 3)] == [0, 1, 0]
    # the skipped mini-batch moved nothing: later steps are finite (and differ from the reference)
    assert all(v == v and abs(v) != float("inf") for v in (rows[3]["loss/value"],
                                                           rows[3]["train/grad_norm"]))  # fmt: skip
    row.update(exit=0, detect_s="same step", lost=0,
               observed="train/nonfinite_skipped=1 at step 2; step 3 finite")  # fmt: skip
