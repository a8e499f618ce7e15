"""The model shapes `rlrt plan` works from: a recipe model's HF `config.json`, or a built-in
table of the recipe models' shapes when the path is absent; and the parameter elements each
pipeline stage holds (embedding, layers, final norm, LM head). Pure arithmetic, no torch."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any


class PlanError(ValueError):
    """The plan cannot be made (unknown GPU kind, unreadable model config): one-line reason."""


@dataclass(frozen=True)
class ModelShape:
    """What the memory of a Qwen3 / Llama 3 GPT model depends on (HF config names in comments)."""

    name: str
    hidden: int  # hidden_size
    ffn: int  # intermediate_size
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    head_dim: int  # head_dim (default hidden / heads)
    vocab: int  # vocab_size
    tied: bool  # tie_word_embeddings
    qk_norm: bool  # Qwen3's per-head q/k RMSNorm
    qkv_bias: bool = False  # attention_bias
    experts: int = 0  # num_experts (Qwen3-MoE; ffn = 0 when every layer is MoE); 0 = dense
    topk: int = 0  # num_experts_per_tok
    moe_ffn: int = 0  # moe_intermediate_size
    dense_layers: tuple[int, ...] = ()  # MoE models: layers with a dense MLP of `ffn`

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.experts) and layer not in self.dense_layers

    def stage_layers(self, pp: int, stage: int) -> range:
        """The decoder layers of pipeline `stage` (megatron's even split)."""
        n = self.layers // pp
        return range(stage * n, (stage + 1) * n)

    def moe_layers(self, pp: int = 1, stage: int = 0) -> int:
        """How many of pipeline `stage`'s layers are MoE (the rest have a dense MLP)."""
        return sum(self.is_moe_layer(i) for i in self.stage_layers(pp, stage))

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], name: str = "") -> ModelShape:
        heads = int(cfg["num_attention_heads"])
        model_type = str(cfg.get("model_type", "")).lower()
        experts, dense = 0, ()
        if model_type == "qwen3_moe":  # (transformers 5 saves `num_local_experts`)
            from rlrt_megatron.megatron.moe.provider import moe_layer_pattern, num_experts

            experts = num_experts(cfg)
            # mlp_only_layers / decoder_sparse_step: transformers' rule
            dense = tuple(i for i, moe in enumerate(moe_layer_pattern(cfg)) if not moe)
        archs = " ".join(cfg.get("architectures") or []).lower()
        return cls(
            name=name or model_type,
            hidden=int(cfg["hidden_size"]),
            ffn=0 if experts and not dense else int(cfg["intermediate_size"]),
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
            vocab=int(cfg["vocab_size"]),
            tied=bool(cfg.get("tie_word_embeddings", False)),
            qk_norm=model_type == "qwen3" or "qwen3" in archs,
            qkv_bias=bool(cfg.get("attention_bias", False)),
            experts=experts,
            topk=int(cfg.get("num_experts_per_tok") or 0) if experts else 0,
            moe_ffn=int(cfg.get("moe_intermediate_size") or 0) if experts else 0,
            dense_layers=dense,
        )


def _qwen3(name: str, h: int, f: int, n_layers: int, heads: int, tied: bool) -> ModelShape:
    return ModelShape(name, h, f, n_layers, heads, 8, 128, 151936, tied, qk_norm=True)


# The recipe models' shapes (their Hugging Face config.json values), used when the recipe's
# `model.hf_path` does not exist on this machine (planning on a laptop before the download).
BUILTIN_SHAPES: dict[str, ModelShape] = {
    s.name.lower(): s
    for s in (
        _qwen3("Qwen3-0.6B", 1024, 3072, 28, 16, tied=True),
        _qwen3("Qwen3-1.7B", 2048, 6144, 28, 16, tied=True),
        _qwen3("Qwen3-4B-Base", 2560, 9728, 36, 32, tied=True),
        _qwen3("Qwen3-4B", 2560, 9728, 36, 32, tied=True),
        _qwen3("Qwen3-8B", 4096, 12288, 36, 32, tied=False),
        _qwen3("Qwen3-8B-Base", 4096, 12288, 36, 32, tied=False),
        ModelShape("Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128, 128256, False, qk_norm=False),
        ModelShape(
            "Qwen3-30B-A3B",
            2048,
            0,
            48,
            32,
            4,
            128,
            151936,
            False,
            qk_norm=True,
            experts=128,
            topk=8,
            moe_ffn=768,
        ),  # fmt: skip
    )
}


def builtin_shape(path: str) -> ModelShape | None:
    """The built-in shape for a model directory named like a table entry (`-Instruct` too)."""
    base = os.path.basename(os.path.normpath(path)).lower()
    for key in (base, base.removesuffix("-instruct")):
        if key in BUILTIN_SHAPES:
            return BUILTIN_SHAPES[key]
    return None


def model_shape(hf_path: str, build_tiny: bool = False) -> tuple[ModelShape, str]:
    """(shape, where it came from) for a recipe's `model.hf_path`."""
    cfg_file = os.path.join(hf_path, "config.json") if hf_path else ""
    if cfg_file and os.path.isfile(cfg_file):
        try:
            with open(cfg_file) as f:
                return ModelShape.from_hf(json.load(f), os.path.basename(hf_path)), cfg_file
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PlanError(f"{cfg_file}: not a usable HF model config ({e!r})") from e
    if build_tiny and not hf_path:
        from rlrt_megatron.convert.tiny import TINY_SHAPE

        tiny = {**TINY_SHAPE, "vocab_size": 512, "tie_word_embeddings": True,
                "model_type": "qwen3"}  # fmt: skip
        return ModelShape.from_hf(tiny, "tiny"), "the built-in tiny demo model"
    shape = builtin_shape(hf_path) if hf_path else None
    if shape is None:
        known = ", ".join(s.name for s in BUILTIN_SHAPES.values())
        raise PlanError(
            f"model.hf_path={hf_path or '(empty)'}: no config.json there and not a built-in "
            f"shape ({known}); point model.hf_path at a directory with the HF config.json"
        )
    return shape, f"built-in shape: {hf_path} not found here"


# ---- exact parameter / buffer accounting (megatron-core 0.16) ------------------------------


def padded_vocab(vocab: int, tp: int) -> int:
    step = 128 * tp
    return math.ceil(vocab / step) * step


def stage_params(shape: ModelShape, tp: int, pp: int, stage: int) -> list[tuple[int, bool, bool]]:
    """(numel, shared_embedding, is_norm) of each parameter of pipeline `stage` on one TP rank,
    in the order megatron registers them (GPTModel: embedding, layers, final norm, LM head)."""
    h, d, t = shape.hidden, shape.head_dim, tp
    v = padded_vocab(shape.vocab, tp) // tp
    first, last = stage == 0, stage == pp - 1
    out: list[tuple[int, bool, bool]] = []
    if first:
        out.append((v * h, shape.tied and pp > 1, False))
    qkv_rows = (shape.heads + 2 * shape.kv_heads) * d // t
    layer = [(h, False, True), (h * shape.heads * d // t, False, False),
             (qkv_rows * h, False, False)]  # fmt: skip
    if shape.qkv_bias:
        layer.append((qkv_rows, False, False))
    if shape.qk_norm:
        layer += [(d, False, True), (d, False, True)]
    mlp = [(2 * shape.ffn // t * h, False, False), (h * shape.ffn // t, False, False)]
    for i in shape.stage_layers(pp, stage):  # MoE layers: experts and router in plan_moe
        out += [*layer, (h, False, True), *([] if shape.is_moe_layer(i) else mlp)]
    if last:
        out.append((h, False, True))  # final norm
        if not shape.tied or pp > 1:
            out.append((v * h, shape.tied, False))  # untied LM head, or the last stage's copy
    return out
