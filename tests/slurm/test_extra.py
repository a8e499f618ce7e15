"""The `slurm` extra alone is enough for `rlrt slurm submit` (issue 25 item 3).

A venv outside the checkout with only `pip install torch==2.13.0 '.[slurm]'` (no dev, no gpu
extra; `make venv-slurm-extra` builds it once, /opt/venv-rlrt-slurm by default, and reuses it
while pyproject.toml is unchanged) runs `submit --dry-run`, renders the header through nemo-run's
executor (equal to the one written without nemo-run), and submits a real job to the local
cluster through nemo-run's LocalTunnel.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from cluster import NOT_TESTED

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("RLRT_SLURM_EXTRA_VENV", "/opt/venv-rlrt-slurm"))
ALLREDUCE = 'python tests/slurm/allreduce_job.py "$@"'
SAME_HEADER = """
from rlrt_megatron.launch.job import SlurmJob
from rlrt_megatron.launch.submit import make_tunnel
job = SlurmJob("qwen3_8b_rlrt", nodes=4, gpus_per_node=8, partition="batch", account="acc",
               time="04:00:00", exclusive=True, sbatch_args={"mem": "0", "qos": "high"},
               home="/shared/rlrt")
cfg = job.validate()
tunnel = make_tunnel(None, "/shared/rlrt/runs/x")
via_nemo = job.sbatch_header(job.executor(tunnel=tunnel))
assert via_nemo == job.sbatch_header(None), (via_nemo, job.sbatch_header(None))
print("same header:", len(via_nemo), "lines")
"""


@pytest.fixture(scope="module")
def extra_python() -> Path:
    py = VENV / "bin" / "python"
    if not py.exists():
        pytest.skip(f"{NOT_TESTED} the slurm extra in a fresh venv: {VENV} missing "
                    "(make venv-slurm-extra)")  # fmt: skip
    return py


def run(py: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    e = dict(env or os.environ, PYTHONPATH=str(REPO))  # this checkout's code, the venv's packages
    e.pop("VIRTUAL_ENV", None)
    return subprocess.run([str(py), *args], env=e, capture_output=True, text=True, timeout=300,
                          cwd=REPO)  # fmt: skip


def test_only_the_slurm_extra_is_installed(extra_python):
    p = run(extra_python, "-c", "import nemo_run, leptonai.api.v1, cloudpickle, fabric; "
            "import importlib.util as u; print([m for m in ('pytest', 'transformer_engine', "
            "'sglang') if u.find_spec(m)])")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "[]"  # no dev, no gpu extra


def test_submit_dry_run_with_only_the_slurm_extra(extra_python, job_dir):
    ckpt = job_dir / "ckpt"
    ckpt.mkdir()
    p = run(extra_python, "-m", "rlrt_megatron.cli", "slurm", "submit", "--recipe", "tiny_demo",
            "--nodes", "2", "--gpus-per-node", "0", "--log-dir", str(job_dir), "--dry-run",
            f"checkpoint.dir={ckpt}")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --requeue",
                 "set -- --recipe tiny_demo"]:  # fmt: skip
        assert line in p.stdout, line
    p = run(extra_python, "-c", SAME_HEADER)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("lines")


def test_submit_with_only_the_slurm_extra(extra_python, cluster, job_dir):
    ckpt = job_dir / "ckpt"
    ckpt.mkdir()
    p = run(extra_python, "-m", "rlrt_megatron.cli", "slurm", "submit", "--recipe", "tiny_demo",
            "--nodes", "2", "--gpus-per-node", "0", "--log-dir", str(job_dir),
            "--env", f"RLRT_TRAIN_CMD={ALLREDUCE}", "--env", f"RLRT_VENV={VENV}",
            "--env", f"PYTHONPATH={REPO}", "parallel.tp=2", f"checkpoint.dir={ckpt}",
            env=cluster.env)  # fmt: skip
    assert p.returncode == 0, p.stderr
    job = re.search(r"submitted job (\d+)", p.stdout).group(1)
    info = cluster.wait_job(job, 240)
    out = (job_dir / f"rlrt-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", out
    assert (
        "allreduce rank 1/2 node node2 sum 1"
        in (job_dir / f"job-{job}" / "node2.r0.train.rank1.log").read_text()
    )
