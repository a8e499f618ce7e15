"""platform: device choice, env -> topology, single-process init, CPU shims, import hygiene."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from rlrt_megatron import platform

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_python(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout.strip().splitlines()[-1]


_DIST_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
    "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_JOB_ID",
)  # fmt: skip


def test_cpu_mode_detection_matches_torch():
    assert platform.is_cpu_mode() == (not torch.cuda.is_available())
    if platform.is_cpu_mode():
        assert platform.backend() == "gloo" and platform.device() == torch.device("cpu")
    else:  # pragma: no cover - GPU machines
        assert platform.backend() == "nccl" and platform.device().type == "cuda"


def test_torchrun_env():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.2",
           "MASTER_PORT": "29600", "SLURM_PROCID": "7", "SLURM_NTASKS": "9"}  # fmt: skip
    d = platform.resolve_dist_env(env)
    assert (d.rank, d.world_size, d.local_rank, d.source) == (3, 8, 1, "torchrun")
    assert (d.master_addr, d.master_port) == ("10.0.0.2", 29600)


def test_slurm_env_derives_address_and_port():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[03-05,9],cpu1", "SLURM_JOB_ID": "123456"}  # fmt: skip
    d = platform.resolve_dist_env(env)
    assert (d.rank, d.world_size, d.local_rank, d.source) == (5, 16, 1, "slurm")
    assert d.master_addr == "gpu03" and d.master_port == 20000 + 123456 % 20000
    env.update(MASTER_ADDR="head", MASTER_PORT="4000")
    d = platform.resolve_dist_env(env)
    assert (d.master_addr, d.master_port) == ("head", 4000)
    with pytest.raises(RuntimeError, match="MASTER_PORT"):
        platform.resolve_dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "MASTER_ADDR": "a"})


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [("node1", "node1"), ("gpu[03-05,9]", "gpu03"), ("a-b[7]", "a-b7"), ("x1,x2", "x1")],
)
def test_first_slurm_host(nodelist, first):
    assert platform.first_slurm_host(nodelist) == first


def test_single_process_default():
    d = platform.resolve_dist_env({})
    assert (d.rank, d.world_size, d.local_rank, d.source) == (0, 1, 0, "single")
    assert d.master_addr == "127.0.0.1" and d.master_port > 0


_INIT_AND_SHIMS = r"""
import json, torch, warnings
warnings.filterwarnings("ignore")
from rlrt_megatron import platform
info = platform.init_distributed(tp=1, pp=1, seed=5)
again = platform.init_distributed(tp=1, pp=1, seed=5)
res = {"world": info.world_size, "same": again is info, "backend": info.backend,
       "source": info.source}
try:
    platform.init_distributed(tp=2, pp=1)
except ValueError as e:
    res["err"] = str(e)
platform.apply_cpu_shims()  # idempotent
from megatron.core.transformer.utils import get_default_causal_mask
m = get_default_causal_mask(3)
res["mask"] = m.int().tolist()
res["mask_dev"] = str(m.device)
from megatron.core import tensor_parallel
tracker = tensor_parallel.get_cuda_rng_tracker()
before = torch.get_rng_state()
with tracker.fork():
    a = torch.rand(4)
res["restored"] = bool(torch.equal(before, torch.get_rng_state()))
with tracker.fork():
    b = torch.rand(4)
tensor_parallel.model_parallel_cuda_manual_seed(5)  # reseed: the stream starts over
with tracker.fork():
    c = torch.rand(4)
res["forked_streams"] = [bool(torch.equal(a, b)), bool(torch.equal(a, c))]
res["default_differs"] = not torch.equal(a, torch.rand(4))
platform.destroy_distributed()
import torch.distributed as dist
res["destroyed"] = not dist.is_initialized()
print(json.dumps(res))
"""


@pytest.mark.skipif(not platform.is_cpu_mode(), reason="checks the CPU shims")
def test_single_process_init_and_cpu_shims():
    res = json.loads(_run_python(_INIT_AND_SHIMS))
    assert res["world"] == 1 and res["same"] and res["backend"] == "gloo"
    assert res["source"] == "single"
    assert "world_size=1 is not divisible by tp*pp=2*1=2" in res["err"]
    assert res["mask"] == [[0, 1, 1], [0, 0, 1], [0, 0, 0]] and res["mask_dev"] == "cpu"
    # fork() swaps in the tracked generator and restores the default one afterwards; the tracked
    # stream advances across forks and restarts after reseeding.
    assert res["restored"]
    assert res["forked_streams"] == [False, True]
    assert res["default_differs"] and res["destroyed"]


def test_algorithms_and_platform_do_not_import_megatron():
    code = (
        "import sys, json, rlrt_megatron.algorithms, rlrt_megatron.platform; "
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('megatron', 'transformer_engine', 'sglang', 'nemo_run'))))"
    )
    assert json.loads(_run_python(code)) == []


# ---- device choice: RLRT_DEVICE and one GPU per rank ---------------------------------------


def test_rlrt_device_cpu_forces_cpu_mode(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("RLRT_DEVICE", "cpu")
    assert platform.is_cpu_mode() and platform.backend() == "gloo"
    monkeypatch.setenv("RLRT_DEVICE", "auto")
    assert not platform.is_cpu_mode() and platform.backend() == "nccl"


def test_rlrt_device_rejects_bad_values(monkeypatch):
    monkeypatch.setenv("RLRT_DEVICE", "tpu")
    with pytest.raises(ValueError, match="RLRT_DEVICE='tpu'"):
        platform.is_cpu_mode()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("RLRT_DEVICE", "cuda")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        platform.is_cpu_mode()


@pytest.mark.parametrize(
    ("gpus", "env", "local_rank", "expect"),
    [
        (8, {"LOCAL_WORLD_SIZE": "8"}, 5, 5),
        (1, {}, 0, 0),
        # srun --gpus-per-task=1: each task sees its own single GPU
        (1, {"SLURM_NTASKS_PER_NODE": "4", "SLURM_STEP_GPUS": "2", "CUDA_VISIBLE_DEVICES": "2"},
         2, 0),
        (1, {"LOCAL_WORLD_SIZE": "2"}, 1, "2 ranks on this node but only 1 visible GPU"),
        (1, {"LOCAL_WORLD_SIZE": "2"}, 0, "2 ranks on this node but only 1 visible GPU"),
        (4, {"SLURM_TASKS_PER_NODE": "8(x2)"}, 0, "8 ranks on this node but only 4"),
    ],
)  # fmt: skip
def test_one_gpu_per_rank(monkeypatch, gpus, env, local_rank, expect):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    for k in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        monkeypatch.delenv(k, raising=False)
    if isinstance(expect, int):
        assert platform._cuda_ordinal(local_rank, env) == expect
    else:
        with pytest.raises(RuntimeError, match=expect) as err:
            platform._cuda_ordinal(local_rank, env)
        assert "RLRT_DEVICE=cpu" in str(err.value)


def test_strict_determinism_only_tightens_an_enabled_mode():
    was = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled())  # fmt: skip
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        with platform.strict_determinism():
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(False)
        with platform.strict_determinism():
            assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
