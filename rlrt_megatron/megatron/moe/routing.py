"""What the trainer does with megatron-core's MoE routers: load metrics and routing replay.

* :class:`RouterStats` - forward hooks on every ``TopKRouter``: tokens routed to each expert per
  layer (training forwards only), reported as ``moe/load_max_over_mean/layer_<i>`` (1.0 = perfectly
  balanced; E / k = every token on the same k experts), plus ``moe/aux_loss`` (megatron's tracked
  load-balancing loss when ``model.moe.aux_loss_coeff > 0``, else 0). Counts are this rank's
  tokens, summed over its data-parallel group (and over TP with sequence parallelism, where
  each TP rank routes its own slice of the sequence).
* Routing replay (R3): megatron-core 0.16's ``RouterReplay`` (``moe_enable_routing_replay``)
  swaps the router's top-k for given indices and gathers the gate values at them, so the router
  weights still get their gradient through the gates. :func:`set_replay` hands each router of a
  model its layer's indices (``[tokens, k]`` in megatron's token order, sequence-major:
  ``s * batch + b``) and :func:`clear_replay` returns them to routing themselves. Each router's
  own ``router_replay`` object is addressed (not megatron's process-global list, which also
  holds the routers of every other model built in the process: the teacher, earlier tests).
  :func:`replay_microbatch` does it for one packed micro-batch of the trainer: the engine's
  experts `[tokens, moe_layers, k]` (column j = the j-th MoE layer of the whole model, as the
  engines record them), cut to this rank's sequence-parallel slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rlrt_megatron.megatron.parallel import unwrap_model


def routers(model_chunks: Sequence[Any]) -> list[tuple[int, Any]]:
    """``(global layer index, TopKRouter)`` for every MoE layer of these chunks."""
    out = []
    for chunk in model_chunks:
        for layer in unwrap_model(chunk).decoder.layers:
            router = getattr(layer.mlp, "router", None)
            if router is not None:
                out.append((layer.layer_number - 1, router))
    return out


class RouterStats:
    """Per-layer tokens-per-expert counters fed by forward hooks (see the module docstring)."""

    def __init__(
        self, model_chunks: Sequence[Any], dp_group: Any = None, sp_group: Any = None
    ) -> None:
        self._counts: dict[int, torch.Tensor] = {}
        self._groups = [g for g in (dp_group, sp_group) if g is not None]
        self._handles = [
            router.register_forward_hook(self._hook(layer))
            for layer, router in routers(model_chunks)
        ]

    def _hook(self, layer: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            if not (module.training and torch.is_grad_enabled()):
                return
            routing_map = output[1]  # [tokens, experts] bool
            counts = routing_map.detach().sum(0).double()
            prev = self._counts.get(layer)
            self._counts[layer] = counts if prev is None else prev + counts

        return hook

    def metrics(self) -> dict[str, float]:
        """The metrics since the last call (then reset). Collective over the DP group."""
        import torch.distributed as dist
        from megatron.core.transformer.moe.moe_utils import (
            clear_aux_losses_tracker,
            get_moe_layer_wise_logging_tracker,
        )

        out: dict[str, float] = {}
        for layer in sorted(self._counts):
            counts = self._counts[layer]
            for group in self._groups:
                if dist.get_world_size(group) > 1:
                    dist.all_reduce(counts, group=group)
            mean = float(counts.mean())
            out[f"moe/load_max_over_mean/layer_{layer}"] = float(counts.max()) / max(mean, 1e-9)
        self._counts.clear()
        if self._handles:
            aux = 0.0
            tracker = get_moe_layer_wise_logging_tracker()
            for name, entry in tracker.items():
                if "load_balancing" in name and entry.get("values") is not None:
                    aux += float(entry["values"].sum())
            clear_aux_losses_tracker()
            out["moe/aux_loss"] = aux
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def set_replay(model_chunks: Sequence[Any], indices: dict[int, torch.Tensor]) -> None:
    """Replay ``indices[layer]`` (``[tokens, k]`` long, megatron's token order) in the next
    forward (and its recompute) of every MoE layer of these chunks."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    for layer, router in routers(model_chunks):
        replay = router.router_replay
        if replay is None:
            raise RuntimeError(
                "routing replay needs the model built with model.moe.routing_replay=rollout "
                "(megatron's moe_enable_routing_replay)"
            )
        replay.clear_indices()
        replay.set_target_indices(indices[layer])
        replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)


def clear_replay(model_chunks: Sequence[Any]) -> None:
    """Routers route themselves again (no recorded or target indices kept)."""
    for _, router in routers(model_chunks):
        if router.router_replay is not None:
            router.router_replay.clear_indices()
            router.router_replay.clear_router_replay_action()


def moe_layers(config: Any) -> list[int]:
    """Global indices of the MoE layers of a model (megatron's `moe_layer_freq`: an int every
    n-th layer from 0, or a 0/1 list per layer), in layer order: the columns of a routing
    record."""
    freq, n = config.moe_layer_freq, config.num_layers
    if isinstance(freq, int):
        return [i for i in range(n) if i % freq == 0]
    return [i for i, f in enumerate(freq) if f]


def replay_microbatch(model_chunks: Sequence[Any], experts: torch.Tensor) -> None:
    """Replay `experts` (`[tokens, moe_layers, k]`, megatron's s-major token order of one
    micro-batch) in the next forward of these chunks' MoE layers. With sequence parallelism a
    router sees only its tensor-parallel rank's contiguous slice of the (s-major) tokens."""
    chunks = list(model_chunks)
    if not chunks:
        return
    config = unwrap_model(chunks[0]).config
    column = {layer: j for j, layer in enumerate(moe_layers(config))}
    if experts.shape[1] != len(column):
        raise ValueError(
            f"routing replay: the engine recorded {experts.shape[1]} MoE layers, the model has "
            f"{len(column)}: the rollout engine does not serve this model"
        )
    if getattr(config, "sequence_parallel", False):
        from megatron.core import parallel_state

        tp = parallel_state.get_tensor_model_parallel_world_size()
        if tp > 1:
            rank = parallel_state.get_tensor_model_parallel_rank()
            experts = experts.view(tp, -1, *experts.shape[1:])[rank]
    set_replay(chunks, {layer: experts[:, j] for layer, j in column.items()})
