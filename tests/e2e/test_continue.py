"""A finished run continued with a larger `train.steps` (issue 24 item 3): its final checkpoint
holds no batch past the last step, so the resume samples the missing ones, in synchronous and in
asynchronous mode."""

from __future__ import annotations

import subprocess

import pytest
from e2e_helpers import clean_env, metrics_rows, train_cmd

# slow tier (`make test-slow`, run by .ci/run when time allows): keeps `make test` < 15 min
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.parametrize("mode", [[], ["rollout.async_steps=1"]], ids=["sync", "async"])
def test_finished_run_continues_with_more_steps(tiny_model, tmp_path, mode):
    run_dir = str(tmp_path / "run")
    for steps, resume in ((1, "none"), (2, "auto")):
        out = subprocess.run(
            train_cmd(tiny_model, run_dir, *mode, f"train.steps={steps}",
                      "checkpoint.save_final=true", "--resume", resume),
            capture_output=True, text=True, timeout=600, env=clean_env(),
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
    rows = metrics_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    # step 2's batch is sampled after the resume, with the checkpoint's weights (version 1)
    assert rows[1]["rollout/version"] == 2
    assert rows[1]["rollout/staleness"] == 0.0
