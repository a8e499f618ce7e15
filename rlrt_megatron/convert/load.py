"""Load a dist checkpoint into live Megatron chunks, and export live chunks as full HF tensors.

`load_checkpoint_into_model` works for whatever TP x PP (x VPP) layout the chunks were built with:
Megatron's own `sharded_state_dict()` says which slice of each global tensor this rank needs and
`dist_checkpointing.load` reads exactly that. Local and Transformer Engine spec names are
translated through `mapping.spec_key_map`, so a checkpoint written with one spec loads into the
other.

`iter_hf_weights` is what the rollout engines consume after each step: full, HF-named tensors with
the vocab padding removed and QKV / gate-up unfused.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from rlrt_megatron.convert import io, mapping

EXTRA_STATE = "_extra_state"


def unwrap(chunk: Any) -> Any:
    """The `GPTModel` inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def model_sharded_state_dict(model_chunks: Sequence[Any], prefix: str = "") -> dict:
    """The chunks' sharded state dict in Megatron's default layout (stacked layers).

    One chunk -> `{"model": ...}`; virtual pipeline chunks -> `{"model0": ..., "model1": ...}`
    (Megatron's own convention; the chunks' keys are global, with no per-chunk prefix, so a
    checkpoint loads at any layout). Use this for every save/load of model weights so the layout
    stays the one `hf_to_megatron` writes. `prefix` (e.g. the trainer's `teacher.`) prefixes the
    dict keys and every sharded key, for a second model in the same checkpoint.
    """
    chunks = [unwrap(c) for c in model_chunks]
    if len(chunks) == 1:
        return {f"{prefix}model": chunks[0].sharded_state_dict(prefix=prefix)}
    return {f"{prefix}model{i}": c.sharded_state_dict(prefix=prefix) for i, c in enumerate(chunks)}


def _checkpoint_keys(ckpt_dir: str | Path) -> set[str]:
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    ckpt = Path(ckpt_dir)
    if not (ckpt / "metadata.json").is_file():
        raise FileNotFoundError(
            f"{ckpt} is not a Megatron dist checkpoint (no metadata.json): convert a Hugging Face "
            "model with `rlrt convert hf-to-megatron --hf DIR --out DIR`"
        )
    return set(load_sharded_metadata(str(ckpt)).keys())


def _iter_sharded(sd: dict) -> Iterator[tuple[dict, str, Any]]:
    for k, v in list(sd.items()):
        if isinstance(v, dict):
            yield from _iter_sharded(v)
        else:
            yield sd, k, v


def load_checkpoint_into_model(model_chunks: Sequence[Any], ckpt_dir: str | Path) -> None:
    """Load the model weights of the dist checkpoint `ckpt_dir` into `model_chunks` in place.

    Collective: every rank of the job calls it. Works at any TP x PP; vocab rows are
    zero-padded to the chunks' padded vocab. TE `_extra_state` (FP8 metadata) is loaded when the
    checkpoint has it and left at its initial value otherwise.
    Raises KeyError naming the parameters the checkpoint lacks.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedTensorFactory

    from rlrt_megatron.megatron import compat

    ckpt_keys = _checkpoint_keys(ckpt_dir)
    sharded = model_sharded_state_dict(model_chunks)
    model_keys = [
        v.key
        for _, _, v in _iter_sharded(sharded)
        if isinstance(v, ShardedBase | ShardedTensorFactory)
    ]
    rename = mapping.spec_key_map(mapping.detect_spec(model_keys), mapping.detect_spec(ckpt_keys))
    missing = []
    for parent, k, v in _iter_sharded(sharded):
        if not isinstance(v, ShardedBase | ShardedTensorFactory):
            continue
        v.key = mapping.rename_key(v.key, rename)
        if v.key not in ckpt_keys:
            if EXTRA_STATE in v.key:
                del parent[k]
            else:
                missing.append(v.key)
    if missing:
        missing = sorted(set(missing))  # a stacked key appears once per local layer
        raise KeyError(
            f"checkpoint {ckpt_dir} lacks {len(missing)} parameter(s) of the model: "
            f"{missing[:10]} (it has e.g. {sorted(ckpt_keys)[:5]}). Is it a "
            "checkpoint of this architecture (same num_layers / qk-norm / tied embeddings)?"
        )
    loaded = compat.dist_load(sharded, ckpt_dir)  # any supported megatron-core's layout
    chunks = [unwrap(c) for c in model_chunks]
    names = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for name, chunk in zip(names, chunks, strict=True):
        result = chunk.load_state_dict(loaded[name], strict=False)
        bad = [k for k in result.missing_keys if EXTRA_STATE not in k]
        if bad or result.unexpected_keys:
            raise RuntimeError(
                f"loading {ckpt_dir} into the model: missing {bad}, unexpected "
                f"{result.unexpected_keys}"
            )


# ------------------------------------------------------------------------- live model -> HF


def shape_from_model(chunk: Any) -> mapping.ModelShape:
    """The mapping's `ModelShape` of a chunk built by `rlrt_megatron.megatron.model.build_model`."""
    from rlrt_megatron.megatron.model import true_vocab_size
    from rlrt_megatron.megatron.moe.provider import megatron_layer_pattern

    model = unwrap(chunk)
    cfg = model.config
    moe = bool(cfg.num_moe_experts)
    pattern = megatron_layer_pattern(cfg.moe_layer_freq, cfg.num_layers) if moe else []
    return mapping.ModelShape(
        model_type="qwen3_moe" if moe else "qwen3" if cfg.qk_layernorm else "llama",
        num_layers=cfg.num_layers,
        hidden=cfg.hidden_size,
        ffn=cfg.ffn_hidden_size,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_query_groups or cfg.num_attention_heads,
        head_dim=cfg.kv_channels,
        vocab_size=true_vocab_size(chunk),
        tied=bool(model.share_embeddings_and_output_weights),
        qk_norm=bool(cfg.qk_layernorm),
        num_experts=int(cfg.num_moe_experts or 0),
        moe_ffn=int(cfg.moe_ffn_hidden_size or 0) if moe else 0,
        dense_layers=tuple(i for i, is_moe in enumerate(pattern) if not is_moe),
    )


_LOCAL_EXPERT = re.compile(r"(\.mlp\.experts\.local_experts\.)(\d+)(\.)|(\.weight)(\d+)$")


def _global_expert_name(name: str, first_expert: int) -> str:
    """`local_experts.{k}.` (SequentialMLP) / `.weight{k}` (TE grouped GEMM) with k local to
    this EP rank -> the global expert index `first_expert + k`."""

    def sub(m: re.Match) -> str:
        if m.group(1):
            return f"{m.group(1)}{first_expert + int(m.group(2))}{m.group(3)}"
        return f"{m.group(4)}{first_expert + int(m.group(5))}"

    return _LOCAL_EXPERT.sub(sub, name) if ".mlp.experts." in name else name


def _local_params(model_chunks: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Megatron name (global layer and expert index) -> this rank's local parameter tensor."""
    out = {}
    for chunk in model_chunks:
        model = unwrap(chunk)
        layers = model.decoder.layers
        for name, p in model.named_parameters():
            if name.startswith("decoder.layers."):
                _, _, j, rest = name.split(".", 3)
                layer = layers[int(j)]
                name = f"decoder.layers.{layer.layer_number - 1}.{rest}"
                experts = getattr(layer.mlp, "experts", None)
                if experts is not None:
                    first = experts.ep_group.rank() * experts.num_local_experts
                    name = _global_expert_name(name, first)
            out[name] = p.detach()
    return out


@torch.no_grad()
def iter_hf_weights(
    model_chunks: Sequence[Any], *, dtype: torch.dtype | str | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, full_tensor)` for every HF parameter, in HF order, from live chunks.

    Collective over the model-parallel group: every rank must iterate to the end in lockstep.
    TP shards are all-gathered on the owning pipeline stage, then broadcast from that stage over
    the pipeline group, so EVERY rank (all TP x PP ranks of each data-parallel replica) receives
    every full tensor; callers that feed a single rollout engine use it on one rank and simply
    drop the tensors elsewhere. Vocab padding is removed; QKV and gate/up are unfused; tied
    models yield no `lm_head.weight`. Tensors are fresh (not views of the parameters), on the
    parameters' device, cast to `dtype` if given.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    target = io.parse_dtype(dtype)
    shape = shape_from_model(model_chunks[0])
    local = _local_params(model_chunks)
    spec = mapping.detect_spec(list(local))
    any_param = next(iter(local.values()))
    device, param_dtype = any_param.device, any_param.dtype

    distributed = dist.is_initialized() and ps.model_parallel_is_initialized()
    tp_size = ps.get_tensor_model_parallel_world_size() if distributed else 1
    pp_size = ps.get_pipeline_model_parallel_world_size() if distributed else 1
    ep_size = ps.get_expert_model_parallel_world_size() if distributed else 1
    etp_size = ps.get_expert_tensor_parallel_world_size() if distributed else 1
    owner: dict[str, int] = {}
    if pp_size > 1:
        pp_group = ps.get_pipeline_model_parallel_group()
        pp_ranks = dist.get_process_group_ranks(pp_group)
        held: list[Any] = [None] * pp_size
        dist.all_gather_object(held, sorted(local), group=pp_group)
        for stage, names in enumerate(held):
            for n in names:
                owner.setdefault(n, stage)
        my_stage = ps.get_pipeline_model_parallel_rank()

    for entry in mapping.entries(shape):
        name = entry.megatron_name(spec)
        rule = entry.rule
        # experts: this layer's router says which stage holds it (every EP rank has the router)
        stage_name = (
            name if entry.expert is None else f"decoder.layers.{entry.layer}.mlp.router.weight"
        )
        full: torch.Tensor | None = None
        on_stage = pp_size == 1 or owner.get(stage_name) == my_stage
        if name in local and on_stage:
            mine = local[name]
            size, group = tp_size, ps.get_tensor_model_parallel_group() if distributed else None
            if entry.expert is not None:
                size, group = etp_size, ps.get_expert_tensor_parallel_group(check_initialized=False)
            if rule.tp_axis is not None and size > 1:
                parts = [torch.empty_like(mine) for _ in range(size)]
                dist.all_gather(parts, mine.contiguous(), group=group)
                full = mapping.merge_tp_shards(rule, parts)
            else:
                full = mine.clone()
            if rule.vocab:
                full = full[: shape.vocab_size].contiguous()
        if entry.expert is not None and ep_size > 1 and on_stage:
            # the EP rank holding expert e sends it to the other EP ranks of its stage
            ep_group = ps.get_expert_model_parallel_group()
            src = entry.expert // (shape.num_experts // ep_size)
            if full is None:
                full = torch.empty(
                    mapping.megatron_shape(entry, shape), dtype=param_dtype, device=device
                )
            dist.broadcast(full, group_src=src, group=ep_group)
        if pp_size > 1:
            name = stage_name
            if name not in owner:
                raise KeyError(f"no pipeline stage holds {name}: model and mapping disagree")
            if full is None:
                full = torch.empty(
                    mapping.megatron_shape(entry, shape), dtype=param_dtype, device=device
                )
            dist.broadcast(full, src=pp_ranks[owner[name]], group=pp_group)
        if full is None:
            raise KeyError(f"the model has no parameter {name} (spec {spec}): mapping mismatch")
        for hf_name, t in zip(entry.hf_names(), mapping.unfuse(rule, full, shape), strict=True):
            yield hf_name, (t.to(target) if target is not None else t)
