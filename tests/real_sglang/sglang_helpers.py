"""Helpers of the `sglang` tier: tiny models, the trainer's (Megatron fp32) log-probs of given
tokens, and a launched CPU SGLangEngine."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from dist_utils import run_distributed
from sglang_env import CPU_ARGS, SERVER_ENV, SGLANG_PYTHON

from rlrt_megatron.rollout.sglang import SGLangEngine

PROBE_PROMPT = [5, 17, 42, 99, 3, 250, 7]
PROBE_RESPONSE = [64, 8, 301, 12, 77, 45, 9, 130]


def make_models(root: Path) -> dict[str, Path]:
    """Two tiny random Qwen3 checkpoints with the same shape ("a" served first, "b" the new
    weights a sync moves in), each with its Megatron dist checkpoint beside it."""
    from rlrt_megatron.convert.hf_to_megatron import hf_to_megatron
    from rlrt_megatron.convert.tiny import make_tiny_model

    out = {}
    for name, seed in (("a", 11), ("b", 12)):
        hf = root / name / "hf"
        make_tiny_model(hf, seed=seed)
        hf_to_megatron(hf, root / name / "mc", show_progress=False)
        out[name] = root / name
    return out


def hf_tensors(model_dir: Path) -> list[tuple[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return list(load_file(model_dir / "hf" / "model.safetensors").items())


def _megatron_logprobs(rank: int, world: int, model_dir: str, rows: list) -> list[list[float]]:
    """In a 1-rank gloo job: the Megatron fp32 model of `model_dir`'s checkpoint, log-probs of
    each row's response tokens after its prompt (the trainer's recompute)."""
    from rlrt_megatron import platform
    from rlrt_megatron.convert import io
    from rlrt_megatron.convert.load import load_checkpoint_into_model
    from rlrt_megatron.convert.parity import megatron_logits
    from rlrt_megatron.megatron.model import build_model

    torch.set_num_threads(1)
    config = io.read_hf_config(os.path.join(model_dir, "hf"))
    vocab = int(config["vocab_size"])
    platform.init_distributed(tp=1, pp=1, seed=0)
    try:
        chunks = build_model(config, tp=1, pp=1, params_dtype=torch.float32)
        load_checkpoint_into_model(chunks, os.path.join(model_dir, "mc"))
        out = []
        for prompt, response in rows:
            seq = torch.tensor([list(prompt) + list(response)])
            logits = megatron_logits(chunks, seq, vocab)[0]
            lp = torch.log_softmax(logits.double(), -1)
            pos = torch.arange(len(prompt) - 1, seq.shape[1] - 1)
            out.append(lp[pos, seq[0, pos + 1]].tolist())
        return out
    finally:
        platform.destroy_distributed()


def megatron_logprobs(model_dir: Path, rows: list) -> list[list[float]]:
    (out,) = run_distributed(_megatron_logprobs, 1, str(model_dir), rows)
    return out


def launch_engine(hf_dir: Path, log_dir: Path, **kw) -> SGLangEngine:
    """One real CPU SGLang server (fp32) through our SGLangEngine."""
    kw.setdefault("colocated", False)
    kw.setdefault("startup_timeout", 600.0)
    kw.setdefault("request_timeout", 600.0)
    return SGLangEngine(
        str(hf_dir),
        dtype="float32",
        mem_fraction=None,
        python=SGLANG_PYTHON,
        env=dict(SERVER_ENV),
        extra_args=CPU_ARGS,
        log_dir=str(log_dir),
        seed=0,
        **kw,
    )


def max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
