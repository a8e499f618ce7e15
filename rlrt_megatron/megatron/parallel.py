"""Small helpers around megatron-core's parallel machinery.

* :func:`wrap_with_ddp` - megatron ``DistributedDataParallel`` + the config hooks the schedules
  use (``finalize_model_grads`` does the DP all-reduce, sums q/k-layernorm grads over TP and the
  tied embedding grads between the first and last pipeline stage).
* :func:`forward_backward` - micro-batches through ``get_forward_backward_func()`` (no pipelining,
  1F1B or interleaved, whichever ``parallel_state`` calls for).
* :func:`gather_full_params` / :func:`gather_full_grads` - TP shards and PP stages reassembled
  into the TP=1/PP=1 layout (megatron names, global layer numbers) on every rank.
* :func:`shard_state_dict_for_tp` - the inverse for one TP rank (used by tests; the converter
  in ``rlrt_megatron.convert`` is the production path).

TP layout facts used below (megatron-core 0.16, local and TE specs alike):
``param.tensor_model_parallel`` marks split params, ``param.partition_dim`` the split axis.
``linear_qkv`` is ordered by query group ``[q_g, k_g, v_g]`` so a dim-0 concat of TP shards is the
TP=1 tensor. ``linear_fc1`` of a gated MLP is ``[gate; up]`` *per rank*, so the TP=1 tensor is
``[gate_0..gate_{tp-1}; up_0..up_{tp-1}]``, not a plain concat.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from rlrt_megatron import platform

__all__ = [
    "forward_backward",
    "gather_full_grads",
    "gather_full_params",
    "global_param_name",
    "shard_state_dict_for_tp",
    "unwrap_model",
    "wrap_with_ddp",
]

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"\.local_experts\.(\d+)\.")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers (anything exposing ``.module``) down to the GPTModel."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def wrap_with_ddp(
    model_chunks: Sequence[torch.nn.Module],
    *,
    use_distributed_optimizer: bool = False,
    overlap_grad_reduce: bool = False,
    grad_reduce_in_fp32: bool = True,
    bucket_size: int | None = None,
) -> list[torch.nn.Module]:
    """Wrap chunks in megatron DDP and install the schedule hooks, as ``megatron.training`` does.

    Sets ``config.finalize_model_grads_func`` (all chunks share one TransformerConfig) and, with
    ``overlap_grad_reduce``, ``config.no_sync_func`` so grad reduction overlaps the last
    micro-batch's backward. Grads then live in ``param.main_grad``; call
    ``chunk.zero_grad_buffer()`` before each step. ``use_distributed_optimizer`` must match the
    ``OptimizerConfig`` given to ``get_megatron_optimizer`` (DDP then allocates the param buffer
    the distributed optimizer copies into). For its checkpoints use
    ``metadata={"distrib_optim_sharding_type": "fully_reshardable"}`` (or ``dp_reshardable``):
    megatron-core 0.16's default ``fully_sharded_model_space`` fails with "flattened_range".
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=bucket_size,
    )
    wrapped = [
        DistributedDataParallel(
            config=chunk.config,
            ddp_config=ddp_config,
            module=chunk,
            # Megatron: only the first chunk buckets; the rest reduce after the pipeline flush.
            disable_bucketing=i > 0,
        )
        for i, chunk in enumerate(model_chunks)
    ]
    config = model_chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    if overlap_grad_reduce:
        no_sync = [m.no_sync for m in wrapped]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    return wrapped


def _to_device(batch: Mapping[str, Any], dev: torch.device) -> dict[str, Any]:
    return {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def forward_backward(
    model_chunks: Sequence[torch.nn.Module],
    microbatches: Sequence[Mapping[str, Any]],
    loss_fn: Callable[[Mapping[str, Any], torch.Tensor], tuple],
    *,
    forward_only: bool = False,
) -> list[Any]:
    """Run ``microbatches`` through megatron's ``forward_backward_func``; return its loss outputs.

    Each micro-batch is a dict with ``input_ids`` ``[B, T]`` and optionally ``position_ids``
    (default ``arange(T)``) and ``attention_mask`` in megatron's convention, bool ``[B, 1, T, T]``
    with True = masked out (default None: the spec's causal mask, right for right-padded rows
    whose padding the loss masks); other keys are passed through to ``loss_fn``. Every PP stage
    receives the same micro-batches (only the first stage reads ``input_ids``, only the last calls
    ``loss_fn``).

    ``loss_fn(batch, logits)`` gets the last stage's output, vocab-parallel logits
    ``[B, T, padded_vocab / tp]``, and returns what megatron expects from a loss function:
    ``(loss, reduced)`` - the schedule divides ``loss`` by the number of micro-batches - or
    ``(loss_sum, num_tokens, reduced)`` - the schedule divides by ``num_tokens`` and the number
    of micro-batches unless ``config.calculate_per_token_loss``. The returned list holds each
    micro-batch's ``reduced`` on the last pipeline stage and is empty elsewhere. ``reduced``
    must not alias ``loss`` (use ``loss.detach().clone()``): the schedule scales ``loss`` in place.

    All micro-batches must share one shape unless ``config.variable_seq_lengths`` (PP sends
    activations of a fixed ``[T, B, hidden]`` shape).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not microbatches:
        raise ValueError("forward_backward needs at least one micro-batch")
    chunks = list(model_chunks)
    config = unwrap_model(chunks[0]).config
    shapes = {tuple(mb["input_ids"].shape) for mb in microbatches}
    if len(shapes) != 1 and not config.variable_seq_lengths:
        raise ValueError(
            f"micro-batches have different input_ids shapes {sorted(shapes)}: pad them to one "
            "shape or set config.variable_seq_lengths=True"
        )
    mbs, seq_len = max(shapes)
    for mb in microbatches:
        mask = mb.get("attention_mask")
        if mask is not None and mask.dim() != 4:
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)}; megatron wants bool [B, 1, T, T] "
                "with True = masked (an HF-style [B, T] keep-mask is not accepted): pass None for "
                "causal attention over right-padded rows"
            )
    dev = platform.device()

    def forward_step(data_iterator: Iterator, model: torch.nn.Module):
        batch = _to_device(next(data_iterator), dev)
        input_ids = batch["input_ids"]
        position_ids = batch.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=dev).expand_as(input_ids)
        output = model(input_ids, position_ids, attention_mask=batch.get("attention_mask"))
        return output, functools.partial(loss_fn, batch)

    # One iterator per model chunk: with interleaving each chunk walks all micro-batches.
    iterators: Any = [iter(microbatches) for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq_len,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )


def global_param_name(model: torch.nn.Module, local_name: str) -> str:
    """Rename ``decoder.layers.<local>.`` to the global layer index (PP/VPP stages number their
    layers from 0; ``TransformerLayer.layer_number`` is the 1-based global one), and a MoE
    layer's ``local_experts.<k>.`` to the global expert index (EP ranks number theirs from 0)."""
    m = _LAYER_RE.match(local_name)
    if m is None:
        return local_name
    layer = unwrap_model(model).decoder.layers[int(m.group(1))]
    name = f"decoder.layers.{layer.layer_number - 1}." + local_name[m.end() :]
    e = _EXPERT_RE.search(name)
    if e is None:
        return name
    experts = layer.mlp.experts
    k = experts.ep_group.rank() * experts.num_local_experts + int(e.group(1))
    return name[: e.start()] + f".local_experts.{k}." + name[e.end() :]


def _is_expert(param: torch.nn.Parameter) -> bool:
    """Megatron marks expert weights ``allreduce=False`` (reduced over the expert-DP group)."""
    return not getattr(param, "allreduce", True)


def _tp_group_of(param: torch.nn.Parameter) -> tuple[int, int, Any]:
    """(size, rank, group) of the tensor-parallel group splitting ``param``: the expert-TP group
    for expert weights, the TP group otherwise."""
    from megatron.core import parallel_state as ps

    if _is_expert(param):
        return (
            ps.get_expert_tensor_parallel_world_size(),
            ps.get_expert_tensor_parallel_rank(),
            ps.get_expert_tensor_parallel_group(),
        )
    return (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_tensor_model_parallel_group(),
    )


def _is_gated_fc1(name: str, config: Any) -> bool:
    # dense MLP and MoE experts alike (`mlp.experts.local_experts.<k>.linear_fc1.weight`)
    return bool(config.gated_linear_unit) and name.endswith("linear_fc1.weight")


def _gather_tp(t: torch.Tensor, param: torch.nn.Parameter, name: str, config: Any) -> torch.Tensor:
    tp, _, group = _tp_group_of(param)
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return t
    dim = param.partition_dim
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.contiguous(), group=group)
    if _is_gated_fc1(name, config):
        halves = [p.chunk(2, dim=dim) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(parts, dim=dim)


def _gather_full(
    model_chunks: Sequence[torch.nn.Module], value: Callable[[torch.nn.Parameter], Any]
) -> dict[str, torch.Tensor]:
    from megatron.core import parallel_state

    local: dict[str, torch.Tensor] = {}
    for chunk in model_chunks:
        model = unwrap_model(chunk)
        for name, param in model.named_parameters():
            # The last stage's copy of a tied embedding duplicates the first stage's weight (and,
            # after finalize_model_grads, its gradient); the TP=1/PP=1 model has no such param.
            if (
                name == "output_layer.weight"
                and model.share_embeddings_and_output_weights
                and not model.pre_process
            ):
                continue
            t = value(param)
            if t is None:
                continue
            full = _gather_tp(t.detach(), param, name, model.config)
            # A copy even on CPU (where .cpu() aliases): callers keep it across optimizer steps.
            local[global_param_name(model, name)] = full.to("cpu", copy=True)
    # EP ranks hold different experts (of the same layers), PP stages different layers
    groups = []
    if parallel_state.get_expert_model_parallel_world_size() > 1:
        groups.append(parallel_state.get_expert_model_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        groups.append(parallel_state.get_pipeline_model_parallel_group())
    for group in groups:
        parts: list[dict[str, torch.Tensor] | None] = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, local, group=group)
        local = {}
        for part in parts:
            local.update(part or {})
    return local


def gather_full_params(model_chunks: Sequence[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """All parameters in the TP=1/PP=1 layout (padded vocab kept), on CPU, on every rank.

    Collective over the TP and PP groups: every rank of those groups must call it.
    """
    return _gather_full(model_chunks, lambda p: p.data)


def gather_full_grads(model_chunks: Sequence[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """All gradients (``main_grad`` under megatron DDP, else ``.grad``) in the TP=1/PP=1 layout.

    Params without a gradient are left out. Collective like :func:`gather_full_params`.
    Raises ``ValueError`` under megatron DDP with ``use_distributed_optimizer`` and DP > 1: the
    reduce-scatter leaves each rank's ``main_grad`` reduced only in its own optimizer shard.
    """
    from megatron.core import parallel_state

    for chunk in model_chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if (
            ddp_config is not None
            and ddp_config.use_distributed_optimizer
            and parallel_state.get_data_parallel_world_size() > 1
        ):
            raise ValueError(
                "gather_full_grads: with the distributed optimizer and data-parallel size "
                f"{parallel_state.get_data_parallel_world_size()} the gradients are reduce-"
                "scattered (each rank holds only its shard); wrap with "
                "use_distributed_optimizer=False to inspect full gradients"
            )

    def grad(p: torch.nn.Parameter) -> torch.Tensor | None:
        g = getattr(p, "main_grad", None)
        return g if g is not None else p.grad

    return _gather_full(model_chunks, grad)


def shard_state_dict_for_tp(
    full_state_dict: Mapping[str, torch.Tensor],
    model: torch.nn.Module,
) -> dict[str, torch.Tensor]:
    """This rank's slice of a TP=1/PP=1 megatron state dict, for ``model`` (one built chunk).

    Picks the chunk's layers (global layer numbers -> local names), splits TP-parallel params
    along ``partition_dim`` (gated ``linear_fc1`` as ``[gate_r; up_r]``), and pads or trims the
    vocab rows to the chunk's padded size (padding rows are zero). The tied output layer of a
    last PP stage gets the embedding weight.
    """
    model = unwrap_model(model)
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        tp, rank, _ = _tp_group_of(param)
        src_name = global_param_name(model, name)
        if name == "output_layer.weight" and src_name not in full_state_dict:
            src_name = "embedding.word_embeddings.weight"  # tied embeddings
        if src_name not in full_state_dict:
            raise KeyError(f"state dict has no {src_name!r} (needed for {name!r})")
        full = full_state_dict[src_name]
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            rows = param.shape[0] * (tp if getattr(param, "tensor_model_parallel", False) else 1)
            full = full[:rows]
            if full.shape[0] < rows:
                pad = full.new_zeros(rows - full.shape[0], *full.shape[1:])
                full = torch.cat([full, pad], dim=0)
        if tp > 1 and getattr(param, "tensor_model_parallel", False):
            dim = param.partition_dim
            if _is_gated_fc1(name, model.config):
                gate, up = full.chunk(2, dim=dim)
                full = torch.cat(
                    [gate.chunk(tp, dim=dim)[rank], up.chunk(tp, dim=dim)[rank]], dim=dim
                )
            else:
                full = full.chunk(tp, dim=dim)[rank]
        if full.shape != param.shape:
            raise ValueError(
                f"{name}: sharded tensor has shape {tuple(full.shape)}, parameter expects "
                f"{tuple(param.shape)}"
            )
        out[name] = full.clone()
    return out
