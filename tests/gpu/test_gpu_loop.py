"""GPU tier: the whole RL loop on one CUDA device (no Transformer Engine or SGLang needed).

- training steps of the tiny demo on CUDA (bf16 policy, bf16 local engine on the same GPU);
- log-probs of the same fp32 weights on the GPU and on the CPU agree within 1e-4;
- a checkpoint written on the GPU resumes on the GPU with the metrics of an uninterrupted run
  (deterministic kernels), and converts to HF on the CPU exactly as on the GPU.

    python -m pytest -q -m gpu tests/gpu/test_gpu_loop.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from gpu_helpers import clean_env

pytestmark = pytest.mark.gpu

HERE = os.path.dirname(os.path.abspath(__file__))
FAST = [
    "rollout.group_size=4",
    "rollout.max_new_tokens=24",
    "train.prompts_per_step=8",
    "train.mini_batch_prompts=4",
    "data.synthetic_size=256",
    "logging.console=plain",
    "logging.tensorboard=false",
    "eval.every=0",
]
NONDETERMINISTIC = ("time/", "throughput/", "memory/")


def _train(tiny: dict, run_dir: str, *extra: str, env: dict | None = None):
    cmd = [
        sys.executable, "-m", "rlrt_megatron.cli", "train", "--recipe", "tiny_demo", *FAST,
        f"model.hf_path={tiny['hf']}", f"model.megatron_ckpt={tiny['megatron']}",
        f"logging.run_dir={run_dir}", *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env or clean_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _computed(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(NONDETERMINISTIC)}


def test_training_steps_on_cuda(gpu_tiny_model, tmp_path):
    rows = _train(
        gpu_tiny_model, str(tmp_path / "run"), "train.steps=3", "checkpoint.resume=none",
        "checkpoint.save_final=false", "checkpoint.save_every=0",
    )  # fmt: skip
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["memory/gpu_peak_gib"] > 0  # the step ran on the GPU
        assert all(v == v for v in r.values() if isinstance(v, float)), r  # no NaN
        assert 0.0 <= r["reward/mean"] <= 1.0
        assert r["train/update_ok"] == 1.0
        assert r["rollout/logprob_abs_diff"] < 0.1  # bf16 engine vs bf16 policy, same weights
    print("gpu steps:", [(r["step"], round(r["time/step"], 3)) for r in rows])


def test_logprobs_gpu_equal_cpu(gpu_tiny_model, tmp_path):
    outs = {}
    for device in ("cpu", "cuda"):
        out = str(tmp_path / f"{device}.pt")
        proc = subprocess.run(
            [sys.executable, os.path.join(HERE, "logprobs_probe.py"), gpu_tiny_model["hf"],
             gpu_tiny_model["megatron"], out],
            capture_output=True, text=True, timeout=300,
            env=clean_env(RLRT_DEVICE=device, MASTER_PORT=str(29700 + len(outs))),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        outs[device] = torch.load(out)
    cpu, gpu = outs["cpu"], outs["cuda"]
    assert cpu["device"] == "cpu" and gpu["device"].startswith("cuda")
    assert torch.equal(cpu["mask"], gpu["mask"])
    for key in ("logprobs", "entropy", "teacher_logprobs", "topk_logprobs"):
        diff = (cpu[key] - gpu[key]).abs().max().item()
        print(f"{key}: max |gpu - cpu| = {diff:.2e}")
        assert diff <= 1e-4, key


def test_resume_on_cuda_reproduces_metrics_and_converts_on_cpu(gpu_tiny_model, tmp_path):
    common = ["train.steps=4", "train.deterministic=true", "checkpoint.keep_last=0"]
    full = _train(
        gpu_tiny_model, str(tmp_path / "full"), *common, "checkpoint.resume=none",
        "checkpoint.save_every=2",
    )  # fmt: skip
    # the first run's step-2 checkpoint, resumed in a fresh process
    resumed_dir = str(tmp_path / "resumed")
    ckpt = os.path.join(str(tmp_path / "full"), "checkpoints", "iter_0000002")
    assert os.path.isdir(ckpt), os.listdir(os.path.join(str(tmp_path / "full"), "checkpoints"))
    resumed = _train(
        gpu_tiny_model, resumed_dir, *common, f"checkpoint.resume={ckpt}",
        "checkpoint.save_every=0", "checkpoint.save_final=false",
    )  # fmt: skip
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed, strict=True):
        a, b = _computed(a), _computed(b)
        bad = {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
        assert not bad, f"step {a['step']}: resumed metrics differ: {bad}"

    # the GPU-written checkpoint converts to HF on the CPU exactly as on the GPU
    final = os.path.join(str(tmp_path / "full"), "checkpoints", "iter_0000004")
    tensors = {}
    for device in ("cpu", "cuda"):
        out = str(tmp_path / f"hf_{device}")
        proc = subprocess.run(
            [sys.executable, "-m", "rlrt_megatron.cli", "convert", "megatron-to-hf",
             "--ckpt", final, "--out", out],
            capture_output=True, text=True, timeout=300, env=clean_env(RLRT_DEVICE=device),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        from safetensors.torch import load_file

        tensors[device] = {
            k: v
            for f in sorted(os.listdir(out))
            if f.endswith(".safetensors")
            for k, v in load_file(os.path.join(out, f)).items()
        }
    assert tensors["cpu"].keys() == tensors["cuda"].keys() and tensors["cpu"]
    for k, v in tensors["cpu"].items():
        assert torch.equal(v, tensors["cuda"][k]), k
