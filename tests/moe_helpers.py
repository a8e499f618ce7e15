"""Shared by the MoE tests: a tiny Qwen3-MoE whose routers are near ties."""

from __future__ import annotations

from pathlib import Path

import torch


def near_tie_moe(root: str | Path, spread: float, **tiny_kw) -> Path:
    """The tiny Qwen3-MoE (`make_tiny_model(root / "hf", arch="qwen3_moe", **tiny_kw)`) with
    every router row within `spread` of one shared row: each token's router logits are nearly
    equal, so rounding (bf16 at 2e-2; fp32's summation order at 1e-6) flips top-k choices
    between an engine and the trainer. Returns the HF directory."""
    from safetensors.torch import load_file, save_file

    from rlrt_megatron.convert.tiny import make_tiny_model

    hf = make_tiny_model(Path(root) / "hf", arch="qwen3_moe", **tiny_kw)
    path = hf / "model.safetensors"
    tensors = load_file(path)
    g = torch.Generator().manual_seed(0)
    for name, t in tensors.items():
        if name.endswith("mlp.gate.weight"):
            base = torch.randn(1, t.shape[1], generator=g)
            tensors[name] = base + spread * torch.randn(t.shape, generator=g)
    save_file(tensors, path, metadata={"format": "pt"})
    return hf
