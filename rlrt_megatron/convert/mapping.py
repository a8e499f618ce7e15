"""The one declarative HF <-> Megatron-Core parameter table, and the transforms it names.

Every conversion path (HF -> dist checkpoint, dist checkpoint -> HF, live model -> HF tensors for
the rollout engines, local <-> Transformer Engine spec names) reads `RULES`; nothing else in the
code base knows a parameter name.

Megatron layouts (TP=1, which is also the global layout stored in a dist checkpoint):
- `linear_qkv.weight`: per KV group g (num_query_groups of them): the group's
  `heads_per_group` query heads, then its key head, then its value head (each `head_dim` rows).
  A TP shard is a contiguous run of whole groups.
- `linear_fc1.weight`: `[gate; up]` along rows. A TP shard is `[gate_r; up_r]` (each rank keeps
  both halves of its slice), which is why the gather for `gate_up` is not a plain concat.
- Embedding / output rows are padded to the TP-dependent padded vocab at run time; the
  checkpoints written here hold exactly `vocab_size` rows (Megatron loads them with
  `allow_shape_mismatch`, zero padding); exports slice back to `vocab_size`.
- Decoder layers are stored stacked: sharded key `decoder.layers.<rest>` with a leading layer axis
  of size num_layers (Megatron's default `sharded_state_dict()` layout), so any PP split loads it.
- Mixture-of-experts (Qwen3-MoE): HF stores each expert's `gate_proj` / `up_proj` / `down_proj`
  (`model.layers.{i}.mlp.experts.{e}.*`) and the router `mlp.gate.weight` [E, hidden]. Megatron's
  `SequentialMLP` names expert e's SwiGLU `mlp.experts.local_experts.{e}.linear_fc1/fc2` (e local
  to the EP rank), TE's grouped GEMM `mlp.experts.linear_fc1.weight{e}`; both save it under one
  sharded key `decoder.layers.mlp.experts.experts.linear_fc{1,2}.weight` with a layer axis and
  then an expert axis (global [L, E, ...]), so any EP split loads it. The pre-MLP norm of a MoE
  layer is a separate `pre_mlp_layernorm` with every spec (no fused TE layernorm-linear).
- Mixed dense / MoE layers (Qwen3-MoE's `mlp_only_layers`, `decoder_sparse_step`): a dense layer
  takes the dense MLP rules (`intermediate_size`), a MoE layer the router / expert rules. Megatron
  then stores every layer under its own index (`decoder.layers.{i}.<rest>`, no layer axis; the
  experts keep their expert axis first: `decoder.layers.{i}.mlp.experts.experts.linear_fc1.weight`
  [E, ...]), its "non-homogeneous" layout, and so does the converter (`Entry.stacked`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlrt_megatron.megatron.moe.provider import moe_layer_pattern

SUPPORTED_MODEL_TYPES = ("qwen3", "llama", "qwen3_moe")
SPECS = ("local", "torch", "te")  # `torch` (SDPA attention) keeps the local names

LAYER = "{i}"
EXPERT = "{e}"


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter and the HF tensor(s) it is made of.

    hf: HF names (with `{i}` for the layer index); several names are fused in this order.
    local: Megatron name with the local (pure PyTorch) and torch (SDPA) layer specs.
    te: Megatron name with the Transformer Engine spec (fused layernorm-linear), if different.
    fuse: "identity" | "qkv" (GQA grouping) | "gate_up" (SwiGLU fc1).
    tp_axis: tensor-parallel split axis of the Megatron tensor: 0 column / vocab, 1 row,
        None replicated (for experts: the expert-tensor-parallel axis).
    vocab: rows are vocabulary entries (padded at run time, sliced on export).
    when: None always; "qk_norm" only for models with q/k RMSNorm (Qwen3);
        "untied" only when `tie_word_embeddings` is false; "dense" / "moe" only in dense / MoE
        decoder layers.
    key: the sharded (dist checkpoint) key when it is not the name without the layer index
        (experts: one key for all experts, with an expert axis).
    """

    hf: tuple[str, ...]
    local: str
    te: str | None = None
    fuse: str = "identity"
    tp_axis: int | None = None
    vocab: bool = False
    when: str | None = None
    key: str | None = None

    @property
    def per_layer(self) -> bool:
        return LAYER in self.local

    @property
    def per_expert(self) -> bool:
        return EXPERT in self.local

    def megatron_name(self, spec: str) -> str:
        if spec not in SPECS:
            raise ValueError(f"unknown layer spec {spec!r}; choose one of {SPECS}")
        return self.te if (spec == "te" and self.te) else self.local


_L = "decoder.layers.{i}."
_H = "model.layers.{i}."

RULES: tuple[Rule, ...] = (
    Rule(("model.embed_tokens.weight",), "embedding.word_embeddings.weight", tp_axis=0, vocab=True),
    Rule(
        (_H + "input_layernorm.weight",),
        _L + "input_layernorm.weight",
        te=_L + "self_attention.linear_qkv.layer_norm_weight",
    ),
    Rule(
        (
            _H + "self_attn.q_proj.weight",
            _H + "self_attn.k_proj.weight",
            _H + "self_attn.v_proj.weight",
        ),
        _L + "self_attention.linear_qkv.weight",
        fuse="qkv",
        tp_axis=0,
    ),
    Rule(
        (_H + "self_attn.q_norm.weight",), _L + "self_attention.q_layernorm.weight", when="qk_norm"
    ),
    Rule(
        (_H + "self_attn.k_norm.weight",), _L + "self_attention.k_layernorm.weight", when="qk_norm"
    ),
    Rule((_H + "self_attn.o_proj.weight",), _L + "self_attention.linear_proj.weight", tp_axis=1),
    Rule(
        (_H + "post_attention_layernorm.weight",),
        _L + "pre_mlp_layernorm.weight",
        te=_L + "mlp.linear_fc1.layer_norm_weight",
        when="dense",
    ),
    Rule(
        (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
        _L + "mlp.linear_fc1.weight",
        fuse="gate_up",
        tp_axis=0,
        when="dense",
    ),
    Rule((_H + "mlp.down_proj.weight",), _L + "mlp.linear_fc2.weight", tp_axis=1, when="dense"),
    Rule((_H + "post_attention_layernorm.weight",), _L + "pre_mlp_layernorm.weight", when="moe"),
    Rule((_H + "mlp.gate.weight",), _L + "mlp.router.weight", when="moe"),
    Rule(
        (_H + "mlp.experts.{e}.gate_proj.weight", _H + "mlp.experts.{e}.up_proj.weight"),
        _L + "mlp.experts.local_experts.{e}.linear_fc1.weight",
        te=_L + "mlp.experts.linear_fc1.weight{e}",
        fuse="gate_up",
        tp_axis=0,
        when="moe",
        key="decoder.layers.mlp.experts.experts.linear_fc1.weight",
    ),
    Rule(
        (_H + "mlp.experts.{e}.down_proj.weight",),
        _L + "mlp.experts.local_experts.{e}.linear_fc2.weight",
        te=_L + "mlp.experts.linear_fc2.weight{e}",
        tp_axis=1,
        when="moe",
        key="decoder.layers.mlp.experts.experts.linear_fc2.weight",
    ),
    Rule(("model.norm.weight",), "decoder.final_layernorm.weight"),
    Rule(("lm_head.weight",), "output_layer.weight", tp_axis=0, vocab=True, when="untied"),
)


# ------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class ModelShape:
    """What the table needs from an HF config."""

    model_type: str
    num_layers: int
    hidden: int
    ffn: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied: bool
    qk_norm: bool
    num_experts: int = 0  # routed experts per MoE layer; 0 = dense model
    moe_ffn: int = 0  # moe_intermediate_size
    dense_layers: tuple[int, ...] = ()  # MoE models: layers with a dense MLP (mlp_only_layers...)

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.num_experts) and layer not in self.dense_layers

    @property
    def mixed(self) -> bool:
        """Dense and MoE layers: megatron stores layers per index (no stacked layer axis)."""
        return bool(self.num_experts and self.dense_layers)


def _cfg(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def model_shape(config: Any) -> ModelShape:
    """Read an HF config (a `PretrainedConfig` or its dict) and check it is supported."""
    model_type = _cfg(config, "model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported architecture: model_type={model_type!r} "
            f"(architectures={_cfg(config, 'architectures')}); supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if _cfg(config, flag, False):
            raise ValueError(
                f"unsupported {model_type} variant: {flag}=True (the Megatron provider builds "
                "bias-free linears); convert a checkpoint without biases"
            )
    heads = int(_cfg(config, "num_attention_heads"))
    kv = int(_cfg(config, "num_key_value_heads") or heads)
    hidden = int(_cfg(config, "hidden_size"))
    head_dim = int(_cfg(config, "head_dim") or hidden // heads)
    if heads % kv:
        raise ValueError(
            f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}"
        )
    n_experts = moe_ffn = 0
    dense_layers: tuple[int, ...] = ()
    if model_type == "qwen3_moe":
        n_experts = int(_cfg(config, "num_experts") or _cfg(config, "num_local_experts") or 0)
        moe_ffn = int(_cfg(config, "moe_intermediate_size"))
        pattern = moe_layer_pattern(config)  # refuses a pattern transformers would not build
        dense_layers = tuple(i for i, moe in enumerate(pattern) if not moe)
    return ModelShape(
        model_type=model_type,
        num_layers=int(_cfg(config, "num_hidden_layers")),
        hidden=hidden,
        ffn=int(_cfg(config, "intermediate_size")),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        vocab_size=int(_cfg(config, "vocab_size")),
        tied=bool(_cfg(config, "tie_word_embeddings", False)),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        num_experts=n_experts,
        moe_ffn=moe_ffn,
        dense_layers=dense_layers,
    )


def active_rules(shape: ModelShape, layer: int | None = None) -> list[Rule]:
    """The rules that apply to this model (drops q/k norms for Llama, lm_head when tied) and,
    given a `layer`, to that decoder layer (dense MLP or router + experts)."""
    out = []
    for rule in RULES:
        if rule.when == "qk_norm" and not shape.qk_norm:
            continue
        if rule.when == "untied" and shape.tied:
            continue
        if layer is None and rule.when in ("dense", "moe"):
            # a model's MLP rules: every kind its layers have
            kinds = {"moe" if shape.is_moe_layer(i) else "dense" for i in range(shape.num_layers)}
            if rule.when not in kinds:
                continue
        elif layer is not None and rule.when == ("dense" if shape.is_moe_layer(layer) else "moe"):
            continue
        out.append(rule)
    return out


# ----------------------------------------------------------------------------------- names


@dataclass(frozen=True)
class Entry:
    """One concrete parameter: a rule instantiated at a layer (None for non-layer rules)."""

    rule: Rule
    layer: int | None
    expert: int | None = None
    stacked: bool = True  # False: megatron's per-layer keys (a mixed dense / MoE model)

    def hf_names(self) -> tuple[str, ...]:
        return tuple(n.format(i=self.layer, e=self.expert) for n in self.rule.hf)

    def megatron_name(self, spec: str) -> str:
        return self.rule.megatron_name(spec).format(i=self.layer, e=self.expert)

    def sharded_key(self, spec: str) -> str:
        """The dist-checkpoint key: layers (and experts) are stacked, so their index is dropped;
        unstacked (`stacked=False`), the layer index stays and only experts are stacked."""
        key = self.rule.key or self.rule.megatron_name(spec).replace(LAYER + ".", "")
        if self.stacked or self.layer is None:
            return key
        return key.replace("decoder.layers.", f"decoder.layers.{self.layer}.", 1)

    def stack_offsets(self, shape: ModelShape) -> list[tuple[int, int, int]]:
        """`(axis, index, size)` of this tensor in its stacked sharded tensor: the layer axis
        (stacked layouts), then the expert axis for experts (empty for non-layer parameters)."""
        out = [] if self.layer is None or not self.stacked else [(0, self.layer, shape.num_layers)]
        return out + ([] if self.expert is None else [(len(out), self.expert, shape.num_experts)])


def entries(shape: ModelShape) -> Iterator[Entry]:
    """All parameters in HF order: embedding, layer 0..L-1 (rule order), final norm, lm_head."""
    rules = active_rules(shape)
    head = [r for r in rules if not r.per_layer and r.local.startswith("embedding.")]
    tail = [r for r in rules if not r.per_layer and not r.local.startswith("embedding.")]
    stacked = not shape.mixed
    yield from (Entry(r, None) for r in head)
    for i in range(shape.num_layers):
        for r in active_rules(shape, i):
            if r.per_expert:
                yield from (Entry(r, i, e, stacked) for e in range(shape.num_experts))
            elif r.per_layer:
                yield Entry(r, i, stacked=stacked)
    yield from (Entry(r, None) for r in tail)


def expected_hf_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for this config (used to name mis-shaped / missing tensors)."""
    h, f, hd = shape.hidden, shape.ffn, shape.head_dim
    per = {
        "embed_tokens": (shape.vocab_size, h),
        "lm_head": (shape.vocab_size, h),
        "q_proj": (shape.num_heads * hd, h),
        "k_proj": (shape.num_kv_heads * hd, h),
        "v_proj": (shape.num_kv_heads * hd, h),
        "o_proj": (h, shape.num_heads * hd),
        "q_norm": (hd,),
        "k_norm": (hd,),
        "gate_proj": (f, h),
        "up_proj": (f, h),
        "down_proj": (h, f),
        "layernorm": (h,),
        "norm": (h,),
        "gate": (shape.num_experts, h),  # the MoE router
        "expert.gate_proj": (shape.moe_ffn, h),
        "expert.up_proj": (shape.moe_ffn, h),
        "expert.down_proj": (h, shape.moe_ffn),
    }
    out = {}
    for entry in entries(shape):
        for name in entry.hf_names():
            module = name.split(".")[-2]
            key = "layernorm" if module.endswith("layernorm") else module
            out[name] = per["expert." + key if entry.expert is not None else key]
    return out


def megatron_shape(entry: Entry, shape: ModelShape) -> tuple[int, ...]:
    """Global (TP=1, unpadded vocab) shape of one Megatron parameter, without the layer axis."""
    hf = expected_hf_shapes(shape)
    parts = [hf[n] for n in entry.hf_names()]
    if entry.rule.fuse == "identity":
        return parts[0]
    return (sum(p[0] for p in parts), parts[0][1])


# ------------------------------------------------------------------------------ transforms


def fuse(rule: Rule, tensors: Sequence[torch.Tensor], shape: ModelShape) -> torch.Tensor:
    """HF tensors of one rule -> the Megatron (TP=1) tensor."""
    if rule.fuse == "identity":
        return tensors[0]
    if rule.fuse == "gate_up":
        return torch.cat(list(tensors), dim=0)
    if rule.fuse == "qkv":
        q, k, v = tensors
        g, hd = shape.num_kv_heads, shape.head_dim
        hidden = q.shape[-1]
        return torch.cat(
            [
                q.reshape(g, shape.heads_per_group * hd, hidden),
                k.reshape(g, hd, hidden),
                v.reshape(g, hd, hidden),
            ],
            dim=1,
        ).reshape(-1, hidden)
    raise ValueError(f"unknown fuse kind {rule.fuse!r}")


def unfuse(rule: Rule, tensor: torch.Tensor, shape: ModelShape) -> list[torch.Tensor]:
    """Megatron (TP=1) tensor -> the rule's HF tensors (contiguous, in `rule.hf` order)."""
    if rule.fuse == "identity":
        return [tensor]
    if rule.fuse == "gate_up":
        gate, up = torch.chunk(tensor, 2, dim=0)
        return [gate.contiguous(), up.contiguous()]
    if rule.fuse == "qkv":
        g, hd, hpg = shape.num_kv_heads, shape.head_dim, shape.heads_per_group
        hidden = tensor.shape[-1]
        grouped = tensor.reshape(g, (hpg + 2) * hd, hidden)
        q, k, v = torch.split(grouped, [hpg * hd, hd, hd], dim=1)
        return [t.reshape(-1, hidden).contiguous() for t in (q, k, v)]
    raise ValueError(f"unknown fuse kind {rule.fuse!r}")


def merge_tp_shards(rule: Rule, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-TP-rank local tensors (rank order) -> the global TP=1 layout (vocab still padded)."""
    if rule.tp_axis is None or len(shards) == 1:
        return shards[0]
    if rule.fuse == "gate_up":
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    # qkv shards are whole KV groups in order, so a plain concat restores the TP=1 layout.
    return torch.cat(list(shards), dim=rule.tp_axis)


def spec_key_map(from_spec: str, to_spec: str) -> dict[str, str]:
    """Sharded-key renames between layer specs (e.g. local `input_layernorm` <-> TE's fused one)."""
    out = {}
    for rule in RULES:
        if rule.key:  # one sharded key whatever the spec (experts)
            continue
        a = rule.megatron_name(from_spec).replace(LAYER + ".", "")
        b = rule.megatron_name(to_spec).replace(LAYER + ".", "")
        if a != b:
            out[a] = b
    return out


_LAYER_KEY = re.compile(r"^(.*?decoder\.layers\.)(\d+)\.(.*)$")


def rename_key(key: str, renames: dict[str, str]) -> str:
    """`key` after `spec_key_map`'s `renames`, for stacked keys and megatron's per-layer keys
    (`decoder.layers.{i}.<rest>`, a mixed dense / MoE model) alike."""
    if key in renames:
        return renames[key]
    m = _LAYER_KEY.match(key)
    if m and m.group(1) + m.group(3) in renames:
        new = renames[m.group(1) + m.group(3)]
        return new.replace(m.group(1), f"{m.group(1)}{m.group(2)}.", 1)
    return key


def detect_spec(keys: Sequence[str]) -> str:
    """Which layer spec a set of Megatron (sharded) keys was written with."""
    return "te" if any(k.endswith("linear_qkv.layer_norm_weight") for k in keys) else "local"
