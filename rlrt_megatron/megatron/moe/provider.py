"""Qwen3-MoE (`Qwen3MoeForCausalLM`) -> megatron-core's MoE layer.

=========================== ===================================== ===============================
HF (Qwen3MoeConfig)         Megatron (TransformerConfig)          note
=========================== ===================================== ===============================
num_experts                 num_moe_experts
num_experts_per_tok         moe_router_topk
moe_intermediate_size       moe_ffn_hidden_size                   expert SwiGLU: fc1 = [gate; up]
intermediate_size           ffn_hidden_size                       dense (mlp_only) layers only
norm_topk_prob=True         moe_router_pre_softmax=False          softmax over the top-k logits
                                                                  = HF's renormalised top-k probs
norm_topk_prob=False        moe_router_pre_softmax=True           softmax over all, then top-k
decoder_sparse_step,        moe_layer_freq (list, 1 = MoE)        HF: layer i is MoE iff i not in
mlp_only_layers                                                   mlp_only_layers and
                                                                  (i + 1) % step == 0
(router softmax in fp32)    moe_router_dtype="fp32"
router_aux_loss_coef        not read: `model.moe.aux_loss_coeff`  RL runs keep it off (peers do)
=========================== ===================================== ===============================

Qwen3-MoE has no shared experts; a config that has them (`shared_expert_intermediate_size`,
Qwen2-MoE) is refused by name. Experts: `SequentialMLP` (one expert after another, any device)
for the `local` and `torch` specs, Transformer Engine's grouped GEMM for `te`. The token
dispatcher is `alltoall` by default: its all-to-all-single runs on gloo, so EP works on CPU
(`allgather` works too; `flex` needs DeepEP).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MOE_MODEL_TYPES = ("qwen3_moe",)
DISPATCHERS = ("alltoall", "allgather")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def is_moe(hf_config: Any) -> bool:
    return _get(hf_config, "model_type") in MOE_MODEL_TYPES


def num_experts(hf_config: Any) -> int:
    """The routed expert count (transformers 5 aliases `num_local_experts`)."""
    n = _get(hf_config, "num_experts")
    if n is None:
        n = _get(hf_config, "num_local_experts", 0)
    return int(n or 0)


def moe_layer_pattern(hf_config: Any) -> list[int]:
    """1 for each MoE decoder layer, 0 for a dense one (transformers' Qwen3MoeDecoderLayer:
    layer i is MoE iff i is not in `mlp_only_layers`, `num_experts > 0` and
    `(i + 1) % decoder_sparse_step == 0`). Megatron takes any such list as `moe_layer_freq`;
    what transformers itself would not build (a step < 1, a layer index out of range) and a
    model without any MoE layer are refused here."""
    n_layers = int(_get(hf_config, "num_hidden_layers"))
    step = _get(hf_config, "decoder_sparse_step", 1)
    step = 1 if step is None else int(step)
    dense = list(_get(hf_config, "mlp_only_layers") or [])
    if step < 1:
        raise ValueError(
            f"HF config decoder_sparse_step={step}: must be >= 1 (1 = every layer MoE, "
            "2 = every second layer)"
        )
    bad = [i for i in dense if not 0 <= int(i) < n_layers]
    if bad:
        raise ValueError(
            f"HF config mlp_only_layers={dense}: {bad} not in 0..{n_layers - 1} "
            f"(num_hidden_layers={n_layers}); list 0-based decoder layer indices"
        )
    n_exp = num_experts(hf_config)
    dense_set = {int(i) for i in dense}
    pattern = [
        int(i not in dense_set and n_exp > 0 and (i + 1) % step == 0) for i in range(n_layers)
    ]
    if not any(pattern):
        raise ValueError(
            f"HF config has no MoE layer (num_experts={n_exp}, decoder_sparse_step={step}, "
            f"mlp_only_layers={dense}, {n_layers} layers): convert it as a dense model"
        )
    return pattern


def megatron_layer_pattern(moe_layer_freq: int | list[int], num_layers: int) -> list[int]:
    """The 1 (MoE) / 0 (dense) list of a built model's `TransformerConfig.moe_layer_freq`
    (megatron's rule for an int N: layer i is MoE iff i % N == 0)."""
    if isinstance(moe_layer_freq, int):
        return [int(i % moe_layer_freq == 0) for i in range(num_layers)]
    return [int(x) for x in moe_layer_freq]


@dataclass(frozen=True)
class MoESettings:
    """How the trainer runs the routers (the `model.moe` config section, flattened).

    aux_loss_coeff: load-balancing (aux) loss coefficient; 0 = off (RL default).
    expert_bias: aux-loss-free expert bias (DeepSeek-V3); needs a sigmoid router, so it is refused
        for Qwen3-MoE's softmax router.
    dispatcher: megatron token dispatcher, `alltoall` or `allgather`.
    routing_replay: True = the trainer's forward replays the rollout's expert choices.
    """

    aux_loss_coeff: float = 0.0
    expert_bias: bool = False
    dispatcher: str = "alltoall"
    routing_replay: bool = False


def moe_settings(moe_config: Any) -> MoESettings:
    """The `MoESettings` of a `config.schema.MoEConfig` (`model.moe`)."""
    return MoESettings(
        aux_loss_coeff=float(moe_config.aux_loss_coeff),
        expert_bias=bool(moe_config.expert_bias),
        dispatcher=str(moe_config.dispatcher),
        routing_replay=moe_config.routing_replay == "rollout",
    )


def check_parallel(hf_config: Any, *, tp: int, ep: int, etp: int | None) -> None:
    """`parallel.ep` must divide the expert count; EP > 1 on a dense model is an error."""
    n = num_experts(hf_config) if is_moe(hf_config) else 0
    if ep < 1 or (etp is not None and etp < 1):
        raise ValueError(f"parallel.ep={ep} and parallel.etp={etp} must be >= 1")
    if n == 0:  # (megatron sets the expert TP size to tp by default: only ep is checked)
        if ep > 1:
            raise ValueError(
                f"parallel.ep={ep} needs a mixture-of-experts model; "
                f"model_type={_get(hf_config, 'model_type')!r} is dense: set parallel.ep=1"
            )
        return
    if n % ep:
        raise ValueError(
            f"parallel.ep={ep} must divide the model's num_experts={n} (each EP rank holds "
            f"num_experts / ep experts); choose ep from the divisors of {n}"
        )
    inter = int(_get(hf_config, "moe_intermediate_size"))
    if inter % (etp or tp):
        raise ValueError(
            f"expert tensor parallel size {etp or tp} (parallel.etp, default parallel.tp) must "
            f"divide moe_intermediate_size={inter}"
        )


def moe_config_kwargs(hf_config: Any, *, spec: str, settings: MoESettings | None = None) -> dict:
    """The `TransformerConfig` MoE fields for a Qwen3-MoE HF config (module docstring table).

    Parallel sizes (`expert_model_parallel_size`, `expert_tensor_parallel_size`) are not set
    here: `build_model` takes them from megatron's `parallel_state`.
    """
    settings = settings or MoESettings()
    for key in ("shared_expert_intermediate_size", "n_shared_experts"):
        if _get(hf_config, key):
            raise ValueError(
                f"HF config {key}={_get(hf_config, key)}: shared experts are not supported "
                "(Qwen3-MoE has none; this looks like Qwen2-MoE / DeepSeek)"
            )
    if settings.dispatcher not in DISPATCHERS:
        raise ValueError(
            f"model.moe.dispatcher={settings.dispatcher!r}; choose one of {', '.join(DISPATCHERS)}"
        )
    if settings.expert_bias:
        raise ValueError(
            "model.moe.expert_bias=true needs a sigmoid router (megatron-core's aux-loss-free "
            "balancing); Qwen3-MoE routes with softmax: set model.moe.expert_bias=false"
        )
    if settings.aux_loss_coeff < 0:
        raise ValueError(f"model.moe.aux_loss_coeff={settings.aux_loss_coeff} must be >= 0")
    pattern = moe_layer_pattern(hf_config)
    te = spec == "te"
    return dict(
        num_moe_experts=num_experts(hf_config),
        moe_router_topk=int(_get(hf_config, "num_experts_per_tok")),
        moe_ffn_hidden_size=int(_get(hf_config, "moe_intermediate_size")),
        moe_router_pre_softmax=not bool(_get(hf_config, "norm_topk_prob", False)),
        moe_router_score_function="softmax",
        moe_router_dtype="fp32",
        moe_layer_freq=1 if all(pattern) else pattern,
        moe_router_load_balancing_type="aux_loss" if settings.aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=float(settings.aux_loss_coeff),
        moe_token_dispatcher_type=settings.dispatcher,
        moe_grouped_gemm=te,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        moe_enable_routing_replay=settings.routing_replay,
    )


def _router_gemm_without_te() -> None:
    """megatron-core 0.16.1's `router_gating_linear` reads `moe_utils.te_general_gemm`, a name
    that module defines only when Transformer Engine imports (NameError otherwise); None selects
    its plain torch matmul path. (0.19 defines it; then this does nothing.)"""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def moe_block_spec(config: Any, spec: str, vp_stage: int | None = None) -> Any:
    """`TransformerBlockSubmodules` for this pipeline (virtual) stage: megatron's decoder block
    spec (MoE or dense MLP per `config.moe_layer_freq`), with the `torch` spec's attention and
    norms swapped in for `spec="torch"`, and our norms for `spec="local"` (`megatron/norm.py`:
    megatron's torch norm refuses sequence parallelism)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    _router_gemm_without_te()
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=spec == "te", normalization=config.normalization,
        vp_stage=vp_stage,
    )  # fmt: skip
    if spec == "torch":
        from rlrt_megatron.megatron.attention import torch_layer_spec
        from rlrt_megatron.megatron.norm import TorchNorm

        block.layer_specs = [torch_layer_spec(layer) for layer in block.layer_specs]
        block.layer_norm = TorchNorm
    elif spec == "local":
        from rlrt_megatron.megatron.norm import LocalNorm, swap_norms

        block.layer_specs = [swap_norms(layer, LocalNorm) for layer in block.layer_specs]
        block.layer_norm = LocalNorm
    return block
