"""`rlrt slurm submit` and the paths a config names (issue 25 items 4, 6, 8): every one is mounted
into a container, the inputs must exist before the job waits in a queue, and the submit output
says which Megatron checkpoint the job starts from."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlrt_megatron.launch.job import SlurmJob, SlurmJobError
from rlrt_megatron.launch.paths import checkpoint_source, container_mounts, named_paths


def job(tmp_path: Path, *overrides: str, **kw) -> SlurmJob:
    kw = {"nodes": 4, "gpus_per_node": 8, "home": "/shared/rlrt", **kw}
    return SlurmJob("qwen3_8b_rlrt", list(overrides), **kw)


def test_every_config_path_is_mounted_in_the_container(tmp_path):
    j = job(
        tmp_path,
        "model.hf_path=/models/hf/Qwen3-8B",
        "model.megatron_ckpt=/models/mcore/qwen3-8b",
        "data.path=/datasets/dapo/dapo-math-17k.parquet",
        "eval.datasets=aime24=/bench/aime24.jsonl,amc23=/shared/rlrt/data/amc23.jsonl",
        "checkpoint.dir=/ckpt/run1/checkpoints",
        "logging.run_dir=/ckpt/run1",
        container_image="nvcr.io/nvidia/pytorch:25.01-py3",
        container_mounts=["/scratch/team:/scratch/team"],
        log_dir="/logs/rlrt",
    )
    cfg = j.validate()
    mounts = j.settings(cfg)["RLRT_CONTAINER_MOUNTS"].split(",")
    assert mounts == [
        "/scratch/team:/scratch/team",  # the user's own first
        "/bench:/bench",  # a file: its directory
        "/ckpt:/ckpt",  # the run dir's parent (the run dir may not exist yet) holds the ckpts
        "/datasets/dapo:/datasets/dapo",
        "/models/hf/Qwen3-8B:/models/hf/Qwen3-8B",
        "/models/mcore/qwen3-8b:/models/mcore/qwen3-8b",
    ]
    # paths under the checkout (/shared/rlrt), the log dir or a user mount need no mount
    cfg2 = SlurmJob("qwen3_8b_rlrt", ["data.path=/scratch/team/d.parquet"], nodes=4,
                    gpus_per_node=8, home="/shared/rlrt").validate()  # fmt: skip
    paths = named_paths(cfg2, lambda p: p if p.startswith("/") else f"/shared/rlrt/{p}")
    assert container_mounts(paths, ["/shared/rlrt", "/scratch/team"]) == []
    # without a container nothing is added
    assert "RLRT_CONTAINER_MOUNTS" not in job(tmp_path).settings(cfg)


def test_submit_refuses_missing_inputs_naming_each(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "hf").mkdir()
    j = job(tmp_path, f"checkpoint.dir={tmp_path}/ckpt", f"model.hf_path={tmp_path}/hf",
            f"data.path={tmp_path}/dapo.parquet",
            f"eval.datasets=aime24={tmp_path}/aime24.jsonl", nodes=1)  # fmt: skip
    with pytest.raises(SlurmJobError) as e:
        j.validate(path_exists=lambda p: Path(p).exists())
    msg = str(e.value)
    assert f"data.path={tmp_path}/dapo.parquet does not exist" in msg
    assert "rlrt data prepare dapo-math-17k" in msg
    assert f"eval.datasets[aime24]={tmp_path}/aime24.jsonl does not exist" in msg
    assert "model.hf_path" not in msg  # it exists
    (tmp_path / "dapo.parquet").write_bytes(b"")
    (tmp_path / "aime24.jsonl").write_text("")
    j.validate(path_exists=lambda p: Path(p).exists())


def test_submit_says_which_checkpoint_the_job_starts_from():
    cfg = SlurmJob("qwen3_8b_rlrt", ["logging.run_dir=/r/x"]).config()
    line = checkpoint_source(cfg, lambda p: p if p.startswith("/") else f"/h/{p}")
    assert "rank 0 converts model.hf_path=/h/checkpoints/hf/Qwen3-8B to /r/x/model/megatron" in line
    cfg = SlurmJob("qwen3_8b_rlrt", ["model.megatron_ckpt=/c/q8"]).config()
    assert checkpoint_source(cfg, str) == (
        "initial weights: model.megatron_ckpt=/c/q8 (converted once; no conversion in the job)"
    )


def test_submit_logs_the_checkpoint_mounts_and_the_empty_eval_warning(tmp_path):
    from rlrt_megatron.config.warnings import config_warnings
    from rlrt_megatron.launch.submit import submit

    for d in ("ckpt", "Qwen3-8B"):
        (tmp_path / d).mkdir()
    (tmp_path / "d.parquet").write_bytes(b"")
    ov = [f"checkpoint.dir={tmp_path}/ckpt", f"logging.run_dir={tmp_path}/r",
          f"model.hf_path={tmp_path}/Qwen3-8B", f"data.path={tmp_path}/d.parquet"]  # fmt: skip
    j = SlurmJob("qwen3_8b_rlrt", ov,
                 nodes=1, gpus_per_node=8, home="/shared/rlrt",
                 container_image="nvcr.io/nvidia/pytorch:25.01-py3")  # fmt: skip
    logged: list[str] = []
    _, script = submit(j, dry_run=True, gpu="h200-141gb", log=logged.append)
    text = "\n".join(logged)
    assert "rank 0 converts model.hf_path=" in text
    assert f"container mounts for the config's paths: {tmp_path}:{tmp_path}" in text
    warn = [
        ln for ln in logged if ln.startswith("warning: eval.every=50 but eval.datasets is empty")
    ]
    assert len(warn) == 1
    assert f"export RLRT_CONTAINER_MOUNTS={tmp_path}:{tmp_path}" in script
    assert config_warnings(SlurmJob("tiny_demo").config()) == []  # it has eval sets
    assert SlurmJob("tiny_demo", home="/shared/rlrt").warnings() == []
    w = SlurmJob("tiny_demo", nodes=2, home="/tmp/rlrt").warnings()
    assert len(w) == 2 and w[0].startswith("--home /tmp/rlrt is under node-local storage")
    assert w[1].startswith("--log-dir /tmp/rlrt/runs/slurm-logs is under node-local")


def test_print_config_works_on_a_login_node():
    # a login node is world size 1; qwen3_8b_rlrt's tp=4 cannot run there but prints (item 9)
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "SLURM_NTASKS")}
    p = subprocess.run([sys.executable, "-m", "rlrt_megatron.cli", "train", "--recipe",
                        "qwen3_8b_rlrt", "--print-config", "train.steps=7"], env=env,
                       capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert p.returncode == 0, p.stderr
    cfg = json.loads(p.stdout)
    assert cfg["train"]["steps"] == 7 and cfg["parallel"]["tp"] == 4
