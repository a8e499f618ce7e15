"""slurm/rlrt.sbatch and slurm/launch.sh without a cluster: `scontrol` and `srun` replaced by
stubs on PATH (the stub srun records its arguments and environment and starts nothing), so the
batch script's decisions - ranks per node from Slurm's variables, the refusal of a GPU job on the
CPU path, the cluster environment of a rank - are checked on any machine. The Slurm tier
(tests/slurm) runs the same scripts on a real two-node cluster."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCONTROL = """#!/bin/bash
[[ $1 == show && $2 == hostnames ]] && for i in $(seq 1 "$STUB_NODES"); do echo "n$i"; done
exit 0
"""
SRUN = """#!/bin/bash
echo "srun $*" >> "$STUB_LOG"
exit 0
"""


def run_sbatch(tmp_path: Path, env: dict[str, str], nodes: int = 4) -> tuple[int, str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "srun.log"
    log.write_text("")
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RLRT_"))}
    e = dict(keep, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_NODES=str(nodes),
             STUB_LOG=str(log), SLURM_JOB_ID="7", SLURM_JOB_NODELIST=f"n[1-{nodes}]",
             RLRT_HOME=str(REPO), RLRT_LOG_DIR=str(tmp_path / "logs"), **env)  # fmt: skip
    p = subprocess.run(["bash", str(REPO / "slurm" / "rlrt.sbatch"), "--recipe", "x"], env=e,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    return p.returncode, p.stdout + p.stderr, log.read_text()


def train_srun(srun_log: str) -> str:
    return next(ln for ln in srun_log.splitlines() if " train " in ln)


def test_the_readme_gpu_example_gets_one_rank_per_gpu(tmp_path):
    # sbatch -N 4 --ntasks-per-node=8 --gpus-per-node=8 slurm/rlrt.sbatch (no RLRT_* settings)
    rc, out, srun = run_sbatch(tmp_path, {"SLURM_GPUS_PER_NODE": "8",
                                          "SLURM_NTASKS_PER_NODE": "8"})  # fmt: skip
    assert rc == 0, out
    assert "4 training node(s) [n1,n2,n3,n4] x 8 rank(s)" in out
    line = train_srun(srun)
    assert "--ntasks=32 " in line and "--ntasks-per-node=8 " in line
    assert "--gpus-per-node=8 " in line


def test_typed_gpu_counts_and_cpu_tasks_per_node(tmp_path):
    rc, out, srun = run_sbatch(tmp_path, {"SLURM_GPUS_PER_NODE": "h100:4",
                                          "SLURM_NTASKS_PER_NODE": "4"}, nodes=2)  # fmt: skip
    assert rc == 0 and "--ntasks=8 " in train_srun(srun), out
    # CPU (no GPUs asked): as many gloo ranks per node as --ntasks-per-node
    rc, out, srun = run_sbatch(tmp_path, {"SLURM_NTASKS_PER_NODE": "2"}, nodes=2)
    assert rc == 0 and "x 2 rank(s)" in out, out
    line = train_srun(srun)
    assert "--ntasks=4 " in line and "--gpus-per-node" not in line
    rc, out, srun = run_sbatch(tmp_path, {}, nodes=2)  # nothing asked: one rank per node
    assert rc == 0 and "--ntasks=2 " in train_srun(srun), out


@pytest.mark.parametrize(
    "env, message",
    [
        ({"SLURM_GPUS_PER_NODE": "8", "SLURM_NTASKS_PER_NODE": "8", "RLRT_GPUS_PER_NODE": "0"},
         "RLRT_GPUS_PER_NODE=0 would start it on the CPU path"),
        ({"SLURM_GPUS_ON_NODE": "8", "RLRT_GPUS_PER_NODE": "0"},
         "RLRT_GPUS_PER_NODE=0 would start it on the CPU path"),
        ({"SLURM_GPUS_PER_NODE": "8", "SLURM_NTASKS_PER_NODE": "1"},
         "8 ranks per node but the job asked Slurm for only 1 task(s) per node"),
        ({"SLURM_GPUS_PER_NODE": "8", "RLRT_TASKS_PER_NODE": "2"},
         "the trainer runs one rank per GPU"),
    ],
)  # fmt: skip
def test_a_gpu_job_that_would_run_wrong_is_refused_before_srun(tmp_path, env, message):
    rc, out, srun = run_sbatch(tmp_path, env)
    assert rc == 2 and message in out, out
    assert srun == ""  # nothing started


def test_a_rank_gets_the_cluster_environment_and_overrides_win(tmp_path):
    base = dict(os.environ, SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1",
                RLRT_HOME=str(REPO), RLRT_VENV=str(tmp_path / "none"))  # fmt: skip
    for k in ("HF_HUB_OFFLINE", "NCCL_DEBUG", "CUDA_DEVICE_MAX_CONNECTIONS", "RLRT_JOB_LOG_DIR",
              "NCCL_SOCKET_IFNAME", "RLRT_SYNC_IFNAME", "GLOO_SOCKET_IFNAME"):  # fmt: skip
        base.pop(k, None)

    def rank_env(**extra: str) -> dict[str, str]:
        p = subprocess.run(["bash", str(REPO / "slurm" / "launch.sh"), "train", "env"],
                           env={**base, **extra}, capture_output=True, text=True,
                           timeout=60)  # fmt: skip
        assert p.returncode == 0, p.stderr
        return dict(ln.split("=", 1) for ln in p.stdout.splitlines() if "=" in ln)

    gpu = rank_env(RLRT_GPUS_PER_NODE="8", RLRT_NET_IF="ib0")
    assert gpu["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and gpu["HF_HUB_OFFLINE"] == "1"
    for k in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "RLRT_SYNC_IFNAME"):
        assert gpu[k] == "ib0"
    assert gpu["NCCL_DEBUG"] == "WARN"
    cpu = rank_env(RLRT_GPUS_PER_NODE="0", HF_HUB_OFFLINE="0", NCCL_DEBUG="INFO",
                   NCCL_SOCKET_IFNAME="eth0", RLRT_NET_IF="ib0")  # fmt: skip
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in cpu  # not on the CPU path
    assert cpu["HF_HUB_OFFLINE"] == "0" and cpu["NCCL_DEBUG"] == "INFO"
    assert cpu["NCCL_SOCKET_IFNAME"] == "eth0" and cpu["RLRT_SYNC_IFNAME"] == "ib0"


def test_sync_address_from_an_interface():
    from rlrt_megatron.topology import interface_address, sync_address

    assert interface_address("lo") == "127.0.0.1"
    assert sync_address("iface:lo") == "127.0.0.1"
    assert sync_address("10.1.2.3") == "10.1.2.3"
    assert sync_address("", env={"RLRT_SYNC_IFNAME": "lo"}) == "127.0.0.1"
    with pytest.raises(ValueError, match="'nope0': no IPv4 address here"):
        sync_address("iface:nope0")


def test_eval_sbatch_runs_rlrt_eval_through_the_launcher(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN)
    (bin_dir / "srun").chmod(0o755)
    log = tmp_path / "srun.log"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_LOG=str(log),
               SLURM_JOB_ID="9", RLRT_HOME=str(REPO),
               RLRT_CONTAINER_IMAGE="nvcr.io/nvidia/pytorch:25.04-py3",
               RLRT_CONTAINER_MOUNTS="/ck:/ck")  # fmt: skip
    script = str(REPO / "slurm" / "eval.sbatch")
    p = subprocess.run(["bash", script, "--ckpt", "/ck/run", "--k", "4"], env=env,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr
    line = log.read_text().strip()
    assert f"--container-mounts={REPO}:{REPO},/ck:/ck" in line
    assert line.endswith(f"bash {REPO}/slurm/launch.sh eval python -m rlrt_megatron.cli eval "
                         "--ckpt /ck/run --k 4")  # fmt: skip
    p = subprocess.run(["bash", script, "--k", "4"], env=env, capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert p.returncode == 2 and "pass rlrt eval arguments (--ckpt" in p.stderr
    # the launcher's eval role runs the command with the cluster environment
    r = subprocess.run(["bash", str(REPO / "slurm" / "launch.sh"), "eval", "printenv",
                        "HF_HUB_OFFLINE"], env=dict(os.environ, SLURM_PROCID="0", SLURM_NTASKS="1",
                        SLURM_NTASKS_PER_NODE="1", RLRT_HOME=str(REPO)),
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-2] == "1", r.stderr
