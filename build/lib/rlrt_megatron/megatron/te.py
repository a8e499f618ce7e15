"""Transformer Engine (TE): availability check, layer spec, FP8 recipe and precision settings.

`model.spec=te` swaps Megatron's local layers for TE's fused ones (LayerNorm fused into the
following linear: `linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`), which FP8
training requires. Everything here is config plumbing, testable on CPU; only
`te_layer_spec()` and `require_transformer_engine()` need the package (`pip install -e '.[gpu]'`).

How the pieces plug into `megatron/model.py` (`build_model(..., spec="te")`):
    require_transformer_engine("model.spec=te")
    layer_spec = te_layer_spec(qk_layernorm=True)               # Qwen3 has q/k norms
    tc_kwargs = {**precision_transformer_kwargs("bf16"), **fp8_transformer_kwargs(fp8)}
    TransformerConfig(..., **tc_kwargs)
and the optimizer: `OptimizerConfig(..., **precision_optimizer_kwargs("bf16", fp8))` and
`DistributedDataParallelConfig(..., **precision_ddp_kwargs(fp8))`.

What FP8 never touches (checked on the GPU by tests/gpu/test_te_spec.py):
- The LM head. Megatron's TE spec swaps the decoder layers only; `GPTModel.output_layer` stays
  a plain `tensor_parallel.ColumnParallelLinear` (a torch matmul, which TE's fp8_autocast does
  not change), and `TransformerBlock` enters fp8_autocast around its layers only
  (megatron.core.fp8_utils.get_fp8_context). So logits and log-probs come from bf16 hidden
  states and a bf16 head; nothing here needs to exclude it.
- The weights sent to the rollout engine. With `fp8_param=False` (default) the parameters are
  bf16 tensors and `convert.load.iter_hf_weights` yields them as they are; with
  `fp8_param=True` they would be Float8Tensors, so the sync must ask for
  `iter_hf_weights(chunks, dtype=torch.bfloat16)` (which dequantizes).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

import torch

GPU_EXTRA_HINT = "install the GPU extra on a CUDA machine: pip install -e '.[gpu]'"


class MissingGPUExtraError(ImportError):
    """A GPU-only feature was asked for but its package (gpu extra) is not installed."""


def te_available() -> bool:
    """True if `transformer_engine` (with its PyTorch bindings) can be imported."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a CUDA-less machine can have the wheel but not load its kernels
        return False
    return True


def require_transformer_engine(feature: str = "model.spec=te") -> None:
    """Raise `MissingGPUExtraError` naming the `gpu` extra if TE cannot be imported."""
    if not te_available():
        raise MissingGPUExtraError(
            f"{feature} needs NVIDIA Transformer Engine, which is not importable here; "
            f"{GPU_EXTRA_HINT} (or set model.spec=local, the CPU-capable layer spec)."
        )


def te_layer_spec(qk_layernorm: bool = True):
    """Megatron's GPT layer spec built from TE modules (fused layernorm + linear)."""
    require_transformer_engine("model.spec=te")
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)


# Megatron's names for the scaling recipes; "current" is our alias for TE's
# Float8CurrentScaling, which Megatron calls "tensorwise".
_RECIPES = {"delayed": "delayed", "current": "tensorwise", "tensorwise": "tensorwise",
            "blockwise": "blockwise", "mxfp8": "mxfp8"}  # fmt: skip


@dataclass(frozen=True)
class FP8Config:
    """FP8 training settings (TE layer spec only).

    enabled: run the GEMMs of the transformer layers in FP8 (default off).
    format: "hybrid" = E4M3 forward, E5M2 gradients (the usual choice); "e4m3" = E4M3 for both.
    recipe: "delayed" (scale from an amax history; TE's DelayedScaling), "current"
        (per-tensor scale from the tensor itself; TE's Float8CurrentScaling, needs TE >= 2.2),
        "blockwise" (Hopper, TE >= 2.3) or "mxfp8" (Blackwell only).
    amax_history_len / amax_compute_algo / margin: delayed-scaling knobs (ignored otherwise).
    fp8_param: keep GEMM weights in FP8 (saves memory, but the master weights of the
        distributed optimizer then gather FP8 params); off by default because RL needs exact
        bf16 weights to push to the rollout engine.
    wgrad: compute weight gradients in FP8 too (False keeps wgrad GEMMs in bf16).
    """

    enabled: bool = False
    format: Literal["hybrid", "e4m3"] = "hybrid"
    recipe: Literal["delayed", "current", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    amax_history_len: int = 1024
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    margin: int = 0
    fp8_param: bool = False
    wgrad: bool = True

    def validate(self, spec: str = "te") -> None:
        """Raise ValueError naming the bad field; called before building TransformerConfig."""
        if self.format not in ("hybrid", "e4m3"):
            raise ValueError(f"fp8.format={self.format!r}: expected 'hybrid' or 'e4m3'")
        if self.recipe not in _RECIPES:
            raise ValueError(f"fp8.recipe={self.recipe!r}: expected one of {sorted(_RECIPES)}")
        if self.amax_compute_algo not in ("max", "most_recent"):
            raise ValueError(
                f"fp8.amax_compute_algo={self.amax_compute_algo!r}: expected 'max' or 'most_recent'"
            )
        if self.amax_history_len < 1:
            raise ValueError(f"fp8.amax_history_len={self.amax_history_len}: must be >= 1")
        if self.fp8_param and not self.enabled:
            raise ValueError("fp8.fp8_param=True needs fp8.enabled=True")
        if self.enabled and spec != "te":
            raise ValueError(
                f"fp8.enabled=True needs model.spec=te (got model.spec={spec!r}): only "
                "Transformer Engine layers run FP8 GEMMs"
            )


def fp8_transformer_kwargs(fp8: FP8Config | None, spec: str = "te") -> dict:
    """TransformerConfig fields for `fp8` ({} when FP8 is off).

    Megatron's TransformerBlock enters TE's fp8_autocast per layer from these fields
    (megatron.core.fp8_utils.get_fp8_context), so no extra context manager is needed.
    """
    if fp8 is None or not fp8.enabled:
        if fp8 is not None:
            fp8.validate(spec)
        return {}
    fp8.validate(spec)
    kwargs = {
        "fp8": fp8.format,
        "fp8_recipe": _RECIPES[fp8.recipe],
        "fp8_param": fp8.fp8_param,
        "fp8_wgrad": fp8.wgrad,
        "fp8_margin": fp8.margin,
    }
    if kwargs["fp8_recipe"] == "delayed":
        kwargs["fp8_amax_history_len"] = fp8.amax_history_len
        kwargs["fp8_amax_compute_algo"] = fp8.amax_compute_algo
    return kwargs


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_params_dtype(params_dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(params_dtype, torch.dtype):
        return params_dtype
    try:
        return _DTYPES[params_dtype]
    except KeyError:
        raise ValueError(
            f"params_dtype={params_dtype!r}: expected one of {sorted(_DTYPES)}"
        ) from None


def precision_transformer_kwargs(params_dtype: str | torch.dtype = "bf16") -> dict:
    """TransformerConfig fields for bf16 (or fp16/fp32) model params."""
    dtype = parse_params_dtype(params_dtype)
    return {
        "params_dtype": dtype,
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
    }


def precision_optimizer_kwargs(
    params_dtype: str | torch.dtype = "bf16", fp8: FP8Config | None = None
) -> dict:
    """OptimizerConfig fields: bf16 params with fp32 master weights in the distributed optimizer.

    With `bf16=True` and `use_precision_aware_optimizer=False`, Megatron's DistributedOptimizer
    keeps an fp32 copy of every (sharded) param, steps Adam in fp32 and casts back to bf16.
    """
    dtype = parse_params_dtype(params_dtype)
    kwargs = {
        "params_dtype": dtype,
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "use_distributed_optimizer": True,
        "use_precision_aware_optimizer": False,
        "main_params_dtype": torch.float32,
        "main_grads_dtype": torch.float32,
        "exp_avg_dtype": torch.float32,
        "exp_avg_sq_dtype": torch.float32,
    }
    if fp8 is not None and fp8.enabled:
        kwargs["fp8_recipe"] = _RECIPES[fp8.recipe]
    return kwargs


def precision_ddp_kwargs(fp8: FP8Config | None = None) -> dict:
    """DistributedDataParallelConfig fields: reduce gradients in fp32 (bf16 sums drift)."""
    kwargs = {"grad_reduce_in_fp32": True, "use_distributed_optimizer": True}
    if fp8 is not None and fp8.enabled and fp8.fp8_param:
        kwargs["fp8_param_gather"] = True
    return kwargs
