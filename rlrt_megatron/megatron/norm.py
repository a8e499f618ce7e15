"""Norms of the `local` and `torch` layer specs, with sequence parallelism.

Megatron-core 0.16's `WrappedTorchNorm` (its norm without TE or apex) refuses
`sequence_parallel=True`, yet a torch norm is already right under it: RMSNorm / LayerNorm
normalise each token over the hidden size, and with sequence parallelism each TP rank holds all
hidden columns of its slice of the tokens. What sequence parallelism needs from a norm is its
gradient bookkeeping: each TP rank's weight gradient covers only its tokens, so the weights
carry `sequence_parallel = True` and megatron's `finalize_model_grads` sums their gradients
over the TP group (as TE's `TENorm` and apex's `FusedLayerNorm` mark theirs). The q/k norms
(over head_dim, after the sequence gather) are summed by name there anyway; they are marked too.

* :class:`TorchNorm` (`model.spec=torch`): weights in `config.params_dtype`, so bf16 runs use
  torch's fused `rms_norm` (fp32 weights with bf16 inputs fail its dtype check).
* :class:`LocalNorm` (`model.spec=local`): fp32 weights like megatron's `WrappedTorchNorm`;
  `build_model` casts the chunk to `params_dtype` afterwards.

:func:`swap_norms` puts one of them into a layer spec in place of megatron's norms,
:func:`block_spec` into a whole decoder block (final norm included).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

__all__ = ["LocalNorm", "TorchNorm", "block_spec", "swap_norms"]


class TorchNorm:
    """`torch.nn.RMSNorm` / `LayerNorm` in `config.params_dtype`, same constructor and parameter
    names as megatron's `WrappedTorchNorm`; its parameters carry `sequence_parallel`."""

    def __new__(
        cls,
        config: Any,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma or config.memory_efficient_layer_norm:
            raise ValueError(
                "model.spec=local/torch: zero-centered gamma / memory-efficient layer norm "
                "need model.spec=te"
            )
        norm_cls = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}.get(
            config.normalization
        )
        if norm_cls is None:
            raise ValueError(
                f"model.spec=local/torch: normalization={config.normalization!r} "
                "(RMSNorm or LayerNorm)"
            )
        norm = norm_cls(hidden_size, eps=eps, dtype=cls._dtype(config))
        for p in norm.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return norm

    @staticmethod
    def _dtype(config: Any) -> torch.dtype:
        return config.params_dtype


class LocalNorm(TorchNorm):
    """:class:`TorchNorm` with fp32 weights (megatron's `WrappedTorchNorm` for the local spec)."""

    @staticmethod
    def _dtype(config: Any) -> torch.dtype:
        return torch.float32


_NORM_FIELDS = ("input_layernorm", "pre_mlp_layernorm")


def swap_norms(layer: Any, norm: type) -> Any:
    """A copy of a transformer-layer `ModuleSpec` whose norms (input, pre-MLP, q/k) are `norm`;
    absent ones (`IdentityOp`, e.g. a fused TE norm) stay absent."""
    from megatron.core.transformer.identity_op import IdentityOp

    layer = copy.deepcopy(layer)
    sub = layer.submodules
    for name in _NORM_FIELDS:
        if getattr(sub, name) is not IdentityOp:
            setattr(sub, name, norm)
    attn = getattr(sub.self_attention, "submodules", None)
    for name in ("q_layernorm", "k_layernorm"):
        if attn is not None and getattr(attn, name, IdentityOp) is not IdentityOp:
            setattr(attn, name, norm)
    return layer


def block_spec(config: Any, layer: Any, norm: type, vp_stage: int | None = None) -> Any:
    """`TransformerBlockSubmodules` for this pipeline (virtual) stage: `layer` (a layer
    `ModuleSpec`) with `norm` swapped in for every layer, and `norm` as the final norm
    (megatron's block would pick its own `LayerNormImpl` for a bare layer spec)."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    layer = swap_norms(layer, norm)
    n_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * n_layers, layer_norm=norm)
