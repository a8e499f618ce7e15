"""A transformers Qwen3-MoE engine's experts: where each token is routed (routing replay, R3),
and where per-expert weights land in transformers' fused expert tensors.

transformers' `Qwen3MoeTopKRouter.forward` returns `(router_logits, top-k weights, top-k
indices)`; :class:`RoutedExperts` hooks every MoE layer's router and keeps the indices of each
forward, so a rollout records which `k` experts every token went to in every layer. Dense models
have no routers: nothing is recorded (``layers == 0``).
"""

from __future__ import annotations

import re
from typing import Any

import torch


class _RouterHooks:
    """A forward hook on every MoE router of a transformers model while the context is active
    (`self._hook(column, layer)`; column = the router's place among the MoE layers)."""

    def __init__(self, model: Any) -> None:
        self.routers = [
            (i, layer.mlp.gate)
            for i, layer in enumerate(_decoder_layers(model))
            if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts")
        ]
        self._handles: list[Any] = []

    @property
    def layers(self) -> int:
        return len(self.routers)

    def __enter__(self) -> Any:
        for j, (i, router) in enumerate(self.routers):
            self._handles.append(router.register_forward_hook(self._hook(j, i)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, column: int, layer: int) -> Any:
        raise NotImplementedError


class RoutedExperts(_RouterHooks):
    """Context manager: while active, every forward's top-k expert indices per MoE layer.

    `calls[j][layer]` is the `[tokens, k]` index tensor of the j-th forward in layer order
    (tokens flattened batch-major, as transformers flattens `[batch, seq]`).
    """

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.calls: list[dict[int, torch.Tensor]] = []

    def _hook(self, column: int, layer: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            if column == 0:
                self.calls.append({})
            self.calls[-1][layer] = output[2].detach()

        return hook

    def per_token(self, call: int = -1) -> torch.Tensor:
        """`[tokens, layers, k]` (int64) of one forward."""
        got = self.calls[call]
        return torch.stack([got[i] for i, _ in self.routers], dim=1)


class ReplayedExperts(_RouterHooks):
    """Context manager: every MoE router of a transformers Qwen3-MoE returns given experts
    instead of its own top-k, for one forward of right-padded rows `[rows, width]`.

    `routed[i]` `[m_i, moe_layers, k]` covers row i's first m_i tokens; the other positions use
    experts 0..k-1 (no log-prob read there depends on them). The gate values are the router's
    softmax at those experts, renormalised when the model normalises its top-k, as in
    megatron's `RouterReplay` and the router's own forward."""

    def __init__(self, model: Any, routed: list, width: int) -> None:
        super().__init__(model)
        k = int(routed[0].shape[-1])
        idx = torch.arange(k).expand(len(routed), width, len(self.routers), k).clone()
        for i, r in enumerate(routed):
            idx[i, : r.shape[0]] = r.long()
        self.indices = idx.flatten(0, 1)  # [rows * width, layers, k], batch-major as the router

    def _hook(self, column: int, layer: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> tuple:
            logits = output[0]
            idx = self.indices[:, column].to(logits.device)
            probs = torch.softmax(logits, dtype=torch.float, dim=-1).gather(1, idx)
            if getattr(module, "norm_topk_prob", False):
                probs = probs / probs.sum(dim=-1, keepdim=True)
            return logits, probs.to(logits.dtype), idx

        return hook


def expert_dtype(num_experts: int) -> torch.dtype:
    """The dtype a routing record is kept in: uint8 up to 256 experts, else int16."""
    return torch.uint8 if num_experts <= 256 else torch.int16


class SGLangExperts:
    """How to read SGLang's routing record of one model (`return_routed_experts`): base64 of
    int32 `[seqlen - 1, num_hidden_layers, k]` (dense layers' columns unused) -> ours,
    `[prompt + response - 1, moe_layers, k]`."""

    def __init__(self, model_path: str) -> None:
        import json
        import os

        from rlrt_megatron.megatron.moe.provider import moe_layer_pattern, num_experts

        with open(os.path.join(model_path, "config.json")) as f:
            cfg = json.load(f)
        self.layers = int(cfg["num_hidden_layers"])
        self.moe_layers = [i for i, m in enumerate(moe_layer_pattern(cfg)) if m]
        self.k = int(cfg["num_experts_per_tok"])
        self.dtype = expert_dtype(num_experts(cfg))

    def decode(self, encoded: str | None, tokens: int, rid: str) -> torch.Tensor:
        import base64

        import numpy as np

        if not encoded:
            raise ValueError(
                f"generate {rid}: no meta_info.routed_experts in the answer; launch the server "
                "with --enable-return-routed-experts (model.moe.routing_replay=rollout)"
            )
        flat = np.frombuffer(base64.b64decode(encoded), dtype=np.int32)
        if flat.size != tokens * self.layers * self.k:
            raise ValueError(
                f"generate {rid}: {flat.size} routed expert ids, expected {tokens} tokens x "
                f"{self.layers} layers x top-{self.k}: the server's model is not the trainer's"
            )
        got = torch.from_numpy(flat.copy()).view(tokens, self.layers, self.k)
        return got[:, self.moe_layers].to(self.dtype)


def _decoder_layers(model: Any) -> Any:
    inner = getattr(model, "model", model)
    return inner.layers


_EXPERT_NAME = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def fused_expert_slot(name: str, state: dict[str, Any]) -> tuple[str, torch.Tensor] | None:
    """transformers >= 5 keeps a MoE layer's experts fused in memory (`experts.gate_up_proj`
    `[E, 2 f, h]` = each expert's gate rows then up rows, `experts.down_proj` `[E, h, f]`) while
    checkpoints, SGLang and our weight stream name them per expert
    (`experts.{e}.gate_proj.weight`). For such a name: (the fused parameter's name, the view of
    it that expert tensor fills); None for any other name or an unfused model."""
    m = _EXPERT_NAME.match(name)
    if m is None:
        return None
    base, e, kind = m.group(1), int(m.group(2)), m.group(3)
    fused_name = f"{base}.down_proj" if kind == "down_proj" else f"{base}.gate_up_proj"
    fused = state.get(fused_name)
    if fused is None or fused.dim() != 3 or e >= fused.shape[0]:
        return None
    view = fused.data[e]
    if kind != "down_proj":
        half = view.shape[0] // 2
        view = view[:half] if kind == "gate_proj" else view[half:]
    return fused_name, view
