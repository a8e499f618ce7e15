"""Submit-time validation and rendering of `rlrt slurm submit` (no cluster needed: default tier)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from cluster import SHARED_ROOT

from rlrt_megatron.launch.job import SlurmJob, SlurmJobError

REPO = Path(__file__).resolve().parents[2]


def rlrt_slurm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlrt_megatron.cli", "slurm", *args],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip


def test_rollout_nodes_must_leave_a_training_node():
    with pytest.raises(SlurmJobError, match=r"--rollout-nodes 4 >= --nodes 4.*at least one node"):
        SlurmJob("qwen3_8b_rlrt", nodes=4, gpus_per_node=8, rollout_nodes=4).validate()


def test_world_size_must_be_a_multiple_of_tp_times_pp():
    # qwen3_8b_rlrt: tp=4; 1 node x 6 GPUs = 6 ranks
    with pytest.raises(SlurmJobError, match=r"6 ranks is not divisible by .* = 4"):
        SlurmJob("qwen3_8b_rlrt", nodes=1, gpus_per_node=6).validate()


def test_tp_group_must_fit_in_a_node():
    with pytest.raises(SlurmJobError, match=r"parallel.tp=4 does not fit in one node"):
        SlurmJob("qwen3_8b_rlrt", nodes=2, gpus_per_node=2).validate()
    with pytest.raises(SlurmJobError, match=r"TP group would straddle two nodes"):
        SlurmJob("qwen3_8b_rlrt", ["parallel.tp=4"], nodes=3, gpus_per_node=6).validate()


def test_rollout_nodes_need_the_sglang_engine():
    with pytest.raises(SlurmJobError, match=r"rollout.engine=local"):
        SlurmJob("tiny_demo", nodes=2, gpus_per_node=8, rollout_nodes=1).validate()


def test_checkpoint_dir_must_exist_on_shared_storage(tmp_path):
    job = SlurmJob("tiny_demo", [f"checkpoint.dir={tmp_path}/nope"], nodes=1, gpus_per_node=0)
    with pytest.raises(SlurmJobError, match=r"does not exist on the cluster's shared storage"):
        job.validate(path_exists=lambda p: Path(p).is_dir())
    (tmp_path / "nope").mkdir()
    job.validate(path_exists=lambda p: Path(p).is_dir())  # fine once it exists
    node_local = SlurmJob("tiny_demo", ["checkpoint.dir=/dev/shm/ck"], nodes=2, gpus_per_node=0)
    with pytest.raises(SlurmJobError, match=r"node-local storage"):
        node_local.validate()


def test_the_8b_layout_from_the_readme_is_valid():
    # 4 nodes x 8 H100, colocated: 32 ranks, tp=4 -> dp=8. `home` is explicit: the default (this
    # checkout) may be under /tmp, which the validation rightly rejects as node-local storage.
    home = "/shared/rlrt-megatron"
    job = SlurmJob("qwen3_8b_rlrt", nodes=4, gpus_per_node=8, home=home)
    cfg = job.validate()
    assert job.describe(cfg) == (
        "4 node(s): 4 training x 8 rank(s) = 32 ranks (tp 4 x pp 1 x dp 8), "
        "rollouts colocated (sglang)"
    )
    # 4 training nodes (32 ranks, dp=8) + 1 node of 4 SGLang servers (tp 2); 4 nodes of which
    # 1 serves (24 ranks, dp=6) is refused by the trainer (tests/unit/test_launch_layout.py)
    job = SlurmJob("qwen3_8b_rlrt", nodes=5, gpus_per_node=8, rollout_nodes=1, home=home)
    if not hasattr(cfg.rollout, "sglang_urls"):
        with pytest.raises(SlurmJobError, match=r"no rollout.sglang_urls"):
            job.validate()
        return
    cfg = job.validate()
    assert job.describe(cfg) == (
        "5 node(s): 4 training x 8 rank(s) = 32 ranks (tp 4 x pp 1 x dp 8), "
        "1 rollout node(s) x 4 SGLang server(s) (tp 2)"
    )


def test_cli_reports_misconfiguration_with_exit_code_2():
    p = rlrt_slurm("submit", "--recipe", "qwen3_8b_rlrt", "--nodes", "2", "--rollout-nodes", "2",
                   "--gpus-per-node", "8", "--dry-run")  # fmt: skip
    assert p.returncode == 2
    assert "--rollout-nodes 2 >= --nodes 2" in p.stderr
    p = rlrt_slurm("submit", "--recipe", "qwen3_8b_rlrt", "--nodes", "1", "--gpus-per-node", "6",
                   "--dry-run")  # fmt: skip
    assert p.returncode == 2 and "not divisible" in p.stderr
    p = rlrt_slurm("submit", "--recipe", "no_such_recipe", "--dry-run")
    assert p.returncode == 2 and "unknown recipe" in p.stderr


@pytest.fixture
def shared_dir():
    """A directory under the repo's runs/ (the tests' stand-in for shared storage; /tmp is
    node-local and refused for multi-node jobs)."""
    d = SHARED_ROOT / f"validation-{uuid.uuid4().hex[:8]}"
    d.mkdir(parents=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_cli_missing_checkpoint_dir_fails_at_submit(shared_dir):  # a dry run needs no nemo-run
    p = rlrt_slurm("submit", "--recipe", "tiny_demo", "--nodes", "2", "--gpus-per-node", "0",
                   "--dry-run", f"checkpoint.dir={shared_dir}/missing")  # fmt: skip
    assert p.returncode == 2
    assert f"checkpoint.dir={shared_dir}/missing does not exist" in p.stderr
    assert "mkdir -p" in p.stderr


def test_dry_run_renders_the_sbatch_template_with_the_jobs_settings(shared_dir):
    (shared_dir / "Qwen3-8B").mkdir()
    (shared_dir / "d.parquet").write_bytes(b"")
    p = rlrt_slurm("submit", "--recipe", "qwen3_8b_rlrt", "--nodes", "5", "--gpus-per-node", "8",
                   "--rollout-nodes", "1", "--time", "04:00:00", "--partition", "batch",
                   "--container-image", "nvcr.io/nvidia/pytorch:25.01-py3", "--dry-run",
                   f"checkpoint.dir={shared_dir}", "train.steps=10",
                   f"model.hf_path={shared_dir}/Qwen3-8B",
                   f"data.path={shared_dir}/d.parquet")  # fmt: skip
    assert p.returncode == 0, p.stderr
    s = p.stdout
    for line in ["#SBATCH --nodes=5", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=04:00:00", "#SBATCH --partition=batch", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@120", "export RLRT_ROLLOUT_NODES=1",
                 "export RLRT_CONTAINER_IMAGE=nvcr.io/nvidia/pytorch:25.01-py3",
                 "set -- --recipe qwen3_8b_rlrt", "scontrol requeue"]:  # fmt: skip
        assert line in s, line
    body = (REPO / "slurm" / "rlrt.sbatch").read_text().split("# ---- end of #SBATCH header")[1]
    assert body.split("\n", 1)[1] in s  # the same job body as slurm/rlrt.sbatch
    script = shared_dir / "job.sbatch"
    script.write_text(s)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
