"""`rlrt plan` and `rlrt slurm submit` run the trainer's own validation at the job's world size
(issue 25 item 1): the README's former layout (4 nodes, 1 of them rollout: 24 ranks, dp 6) is
refused with the trainer's message and valid layouts near it are suggested."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from recipes import get_recipe
from rlrt_megatron.config import validation_errors
from rlrt_megatron.launch.job import SlurmJob, SlurmJobError
from rlrt_megatron.launch.layout import check_world, model_dims, suggest_layouts, world_size
from rlrt_megatron.launch.plan import plan_config

REPO = Path(__file__).resolve().parents[2]
DP6 = (
    "a mini-batch of 1024 rollouts (mini_batch_prompts * group_size) must divide over "
    "data parallel 6"
)


def test_plan_refuses_dp6_with_the_trainers_message_and_suggests_valid_layouts():
    cfg = get_recipe("qwen3_8b_rlrt")
    plan = plan_config(cfg, nodes=4, gpus_per_node=8, limit_gib=79.6, rollout_nodes=1)
    assert not plan.fits
    assert any(DP6 in p for p in plan.problems), plan.problems
    assert plan.suggestion.startswith("--nodes 5 --rollout-nodes 1 (32 ranks: tp 4 x pp 1 x dp 8)")
    # every suggestion is accepted by the trainer at its world size and fits in memory
    errs, near = check_world(cfg, nodes=4, gpus_per_node=8, rollout_nodes=1)
    assert errs and len(near) == 3
    for text in near:
        f = text.split(" (")[0].split()
        n, k = int(f[f.index("--nodes") + 1]), int(f[f.index("--rollout-nodes") + 1])
        w = world_size(n, 8, k)
        assert validation_errors(cfg, model_dims(cfg), w) == []
        assert plan_config(cfg, nodes=n, gpus_per_node=8, limit_gib=79.6, rollout_nodes=k).fits
    # the valid layout of the README passes
    assert plan_config(cfg, nodes=5, gpus_per_node=8, limit_gib=79.6, rollout_nodes=1).fits


def test_plan_suggests_tp_pp_when_the_nodes_are_fixed():
    cfg = get_recipe("qwen3_8b_rlrt", ["train.mini_batch_prompts=3", "train.prompts_per_step=3",
                                       "rollout.group_size=2"])  # fmt: skip
    errs, near = check_world(cfg, nodes=1, gpus_per_node=8)  # 6 rollouts over dp 2: fine
    assert not errs
    errs, near = check_world(cfg, nodes=2, gpus_per_node=8)  # 6 rollouts over dp 4
    assert "must divide over data parallel 4" in errs[0]
    assert near[0] == "--nodes 3 (24 ranks: tp 4 x pp 1 x dp 6)"  # nearest first
    near = suggest_layouts(cfg, nodes=2, gpus_per_node=8, limit=10)
    assert "parallel.tp=8 (16 ranks: tp 8 x pp 1 x dp 2)" in near, near


def test_submit_refuses_dp6_before_rendering():
    job = SlurmJob("qwen3_8b_rlrt", nodes=4, gpus_per_node=8, rollout_nodes=1, home="/shared/x")
    with pytest.raises(SlurmJobError, match=r"(?s)the trainer refuses 24 ranks: .*data parallel 6"
                       r".*valid layouts near it: --nodes 5 --rollout-nodes 1"):  # fmt: skip
        job.validate(limit_gib=79.6)
    SlurmJob("qwen3_8b_rlrt", nodes=5, gpus_per_node=8, rollout_nodes=1).validate()


def test_cli_plan_and_submit_dry_run_refuse_the_readme_layout(tmp_path):
    run = [sys.executable, "-m", "rlrt_megatron.cli"]
    base = ["--recipe", "qwen3_8b_rlrt", "--nodes", "4", "--rollout-nodes", "1"]
    p = subprocess.run([*run, "plan", *base], capture_output=True, text=True, cwd=REPO,
                       timeout=300)  # fmt: skip
    assert p.returncode == 3, p.stderr
    assert DP6 in p.stdout and "suggestion: --nodes 5 --rollout-nodes 1" in p.stdout
    assert p.stdout.strip().splitlines()[-1] == "fits=no peak_gib=nan limit_gib=79.6"
    p = subprocess.run([*run, "slurm", "submit", *base, "--dry-run",
                        f"checkpoint.dir={tmp_path}"], capture_output=True, text=True, cwd=REPO,
                       timeout=300)  # fmt: skip
    assert p.returncode == 2 and DP6 in p.stderr and "--nodes 5 --rollout-nodes 1" in p.stderr
    assert p.stdout == ""  # no script rendered
