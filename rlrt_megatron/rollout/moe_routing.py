"""The experts a transformers Qwen3-MoE engine routes each token to (for routing replay, R3).

transformers' `Qwen3MoeTopKRouter.forward` returns `(router_logits, top-k weights, top-k
indices)`; :class:`RoutedExperts` hooks every MoE layer's router and keeps the indices of each
forward, so a rollout records which `k` experts every token went to in every layer. Dense models
have no routers: nothing is recorded (``layers == 0``).
"""

from __future__ import annotations

from typing import Any

import torch


class RoutedExperts:
    """Context manager: while active, every forward's top-k expert indices per MoE layer.

    `calls[j][layer]` is the `[tokens, k]` index tensor of the j-th forward in layer order
    (tokens flattened batch-major, as transformers flattens `[batch, seq]`).
    """

    def __init__(self, model: Any) -> None:
        self.routers = [
            (i, layer.mlp.gate)
            for i, layer in enumerate(_decoder_layers(model))
            if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts")
        ]
        self.calls: list[dict[int, torch.Tensor]] = []
        self._handles: list[Any] = []

    @property
    def layers(self) -> int:
        return len(self.routers)

    def __enter__(self) -> RoutedExperts:
        for i, router in self.routers:
            self._handles.append(router.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, layer: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            if layer == self.routers[0][0]:
                self.calls.append({})
            self.calls[-1][layer] = output[2].detach()

        return hook

    def per_token(self, call: int = -1) -> torch.Tensor:
        """`[tokens, layers, k]` (int64) of one forward."""
        got = self.calls[call]
        return torch.stack([got[i] for i, _ in self.routers], dim=1)


def _decoder_layers(model: Any) -> Any:
    inner = getattr(model, "model", model)
    return inner.layers
