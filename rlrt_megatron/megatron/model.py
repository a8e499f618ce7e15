"""Megatron-Core ``GPTModel`` from a Hugging Face config: Qwen3 and Llama 3.

The mapping (HF -> Megatron) follows transformers' modeling code, checked line by line:

=========================== ===================================== ===============================
HF (Qwen3Config/LlamaConfig) Megatron                             note
=========================== ===================================== ===============================
num_hidden_layers           num_layers
hidden_size                 hidden_size
intermediate_size           ffn_hidden_size                       SwiGLU: fc1 = [gate; up]
num_attention_heads         num_attention_heads
num_key_value_heads         num_query_groups                      GQA
head_dim                    kv_channels                           Qwen3: head_dim != hidden/heads
rms_norm_eps                layernorm_epsilon                     normalization="RMSNorm"
hidden_act="silu"           gated_linear_unit + activation silu
(qwen3)                     qk_layernorm=True                     RMSNorm over head_dim, pre-RoPE
attention_bias              add_qkv_bias                          o_proj has no bias in either
rope theta                  GPTModel(rotary_base=...)             rope_parameters / rope_theta
rope_scaling llama3         GPTModel(rope_scaling, factor)        + low/high freq factors and
                                                                  original_max: compat.py
tie_word_embeddings         share_embeddings_and_output_weights
vocab_size                  padded to a multiple of 128 * tp      see ``padded_vocab_size``
=========================== ===================================== ===============================

Padded vocabulary: every model chunk built here carries ``true_vocab_size`` (the HF vocab size)
and ``padded_vocab_size`` attributes. Logits (and the vocab-parallel shards of them) have
``padded_vocab_size`` columns; rows ``>= true_vocab_size`` are padding, so log-prob, entropy and
sampling code must mask them (``logits[..., true_vocab_size:] = -inf`` in the shard that holds
them). Use :func:`true_vocab_size` to read it from a model chunk.

Parameter names are megatron's own (local spec: ``decoder.layers.0.self_attention.linear_qkv.
weight``, ``...input_layernorm.weight``, ``decoder.final_layernorm.weight``, ...; the ``torch``
spec of ``megatron/attention.py`` has the same); the converter's mapping table relies on them.

Layer specs (``model.spec``, :func:`resolve_spec`): ``local`` Megatron's pure-PyTorch modules
(dense ``[s, s]`` attention; CPU tests), ``torch`` the same with PyTorch SDPA attention over packed
sequences and params-dtype norms (GPUs without Transformer Engine), ``te`` Transformer Engine
(clusters, FP8); ``auto`` picks te / torch / local by what this machine has.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F

from rlrt_megatron import platform
from rlrt_megatron.megatron.moe import provider as moe_provider

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "build_model",
    "SPECS",
    "get_layer_spec",
    "gpt_model_kwargs_from_hf",
    "padded_vocab_size",
    "resolve_spec",
    "transformer_config_from_hf",
    "true_vocab_size",
]

SUPPORTED_MODEL_TYPES = ("qwen3", "llama", "qwen3_moe")

SPECS = ("local", "torch", "te")
Spec = Literal["auto", "local", "torch", "te"]


def resolve_spec(spec: str) -> str:
    """`auto` -> `te` with Transformer Engine on a GPU, `torch` on a GPU without it, `local` on
    CPU; any other value is checked and returned."""
    if spec == "auto":
        if platform.is_cpu_mode():
            return "local"
        from rlrt_megatron.megatron.te import te_available

        return "te" if te_available() else "torch"
    if spec not in SPECS:
        raise ValueError(f"model.spec must be one of auto, {', '.join(SPECS)}; got {spec!r}")
    return spec


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Vocab size padded the Megatron way: ``ceil(V / (multiple * tp)) * multiple * tp``.

    Every TP rank then holds an equal ``padded / tp`` slice of the embedding and output layer
    (megatron/training/tokenizer: ``_vocab_size_with_padding``).
    """
    if vocab_size < 1 or tp < 1 or multiple < 1:
        raise ValueError(f"need vocab_size, tp, multiple >= 1, got {vocab_size}, {tp}, {multiple}")
    step = multiple * tp
    return int(math.ceil(vocab_size / step) * step)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """Read ``key`` from a transformers config object or a plain ``config.json`` dict."""
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _model_type(hf_config: Any) -> str:
    model_type = _get(hf_config, "model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported architecture: HF config model_type={model_type!r}; supported model_type "
            f"values are {', '.join(SUPPORTED_MODEL_TYPES)} (Qwen3 dense, Llama 3, Qwen3-MoE)"
        )
    return model_type


def _rope_parameters(hf_config: Any) -> dict[str, Any]:
    """RoPE settings as one dict across transformers versions.

    transformers >= 5 stores ``rope_parameters = {"rope_type", "rope_theta", ...}``; older
    versions keep ``rope_theta`` at the top level and scaling under ``rope_scaling``.
    """
    params = dict(_get(hf_config, "rope_parameters") or {})
    scaling = _get(hf_config, "rope_scaling")
    if scaling:
        params = {**dict(scaling), **params}
    if "rope_theta" not in params:
        params["rope_theta"] = _get(hf_config, "rope_theta", 10000.0)
    if "rope_type" not in params:
        params["rope_type"] = params.get("type", "default")
    return params


def _head_dim(hf_config: Any) -> int:
    head_dim = _get(hf_config, "head_dim")
    if head_dim is None:
        head_dim = _get(hf_config, "hidden_size") // _get(hf_config, "num_attention_heads")
    return int(head_dim)


def gpt_model_kwargs_from_hf(hf_config: Any) -> dict[str, Any]:
    """The ``GPTModel`` constructor arguments (not part of ``TransformerConfig``) for a HF config.

    RoPE: theta -> ``rotary_base``; ``rope_type="llama3"`` -> ``rope_scaling=True`` with
    ``rope_scaling_factor=factor`` (megatron's ``_apply_scaling`` reproduces transformers'
    ``_compute_llama3_parameters``; it fixes low/high freq factors 1/4 and original context 8192,
    the values of every Llama 3.1/3.2/3.3 release, and ``build_model`` applies other values with
    ``compat.apply_llama3_rope``).
    """
    _model_type(hf_config)
    rope = _rope_parameters(hf_config)
    rope_type = rope["rope_type"]
    kwargs: dict[str, Any] = {
        "max_sequence_length": int(_get(hf_config, "max_position_embeddings")),
        "position_embedding_type": "rope",
        "rotary_percent": 1.0,
        "rotary_base": float(rope["rope_theta"]),
        "share_embeddings_and_output_weights": bool(_get(hf_config, "tie_word_embeddings", False)),
        "rope_scaling": False,
    }
    if rope_type == "llama3":
        kwargs["rope_scaling"] = True
        kwargs["rope_scaling_factor"] = float(rope["factor"])
    elif rope_type != "default":
        raise ValueError(
            f"rope type {rope_type!r} (HF config rope_parameters/rope_scaling) is not supported; "
            f"supported: 'default', 'llama3'"
        )
    return kwargs


def transformer_config_from_hf(
    hf_config: Any,
    *,
    tp: int,
    pp: int,
    params_dtype: torch.dtype = torch.float32,
    spec: Spec = "local",
    vpp: int | None = None,
    moe: Any = None,
    **overrides: Any,
):
    """Build a megatron ``TransformerConfig`` for a Qwen3 / Llama 3 / Qwen3-MoE HF config.

    ``moe``: a ``megatron.moe.provider.MoESettings`` (router aux loss, dispatcher, routing
    replay) for a MoE model; ignored for dense ones.

    ``params_dtype`` sets the parameter dtype (and ``bf16``/``fp16`` flags, ``pipeline_dtype``
    for the PP p2p buffers). Fusions that need TE/apex kernels are enabled only for ``spec="te"``.
    ``overrides`` are applied last (any ``TransformerConfig`` field, e.g. ``recompute_granularity``,
    ``sequence_parallel``).
    """
    from megatron.core.transformer import TransformerConfig

    model_type = _model_type(hf_config)
    n_heads = int(_get(hf_config, "num_attention_heads"))
    n_kv = int(_get(hf_config, "num_key_value_heads") or n_heads)
    for key, value in (("num_attention_heads", n_heads), ("num_key_value_heads", n_kv)):
        if value % tp != 0:
            raise ValueError(
                f"tensor parallel size tp={tp} must divide HF config {key}={value}; "
                f"choose tp from the divisors of {value}"
            )
    n_layers = int(_get(hf_config, "num_hidden_layers"))
    stages = pp * (vpp or 1)
    if n_layers % stages != 0:
        raise ValueError(
            f"num_hidden_layers={n_layers} must be divisible by pp*vpp={stages} (each pipeline "
            f"stage gets the same number of layers)"
        )
    act = _get(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported (SwiGLU needs 'silu')")
    if _get(hf_config, "mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported (Llama 3 / Qwen3 have no MLP bias)")
    if model_type != "llama" and _get(hf_config, "use_sliding_window", False):
        raise ValueError("Qwen3 use_sliding_window=True is not supported")
    gpt_model_kwargs_from_hf(hf_config)  # validate rope settings early

    spec = resolve_spec(spec)
    te = spec == "te"
    kwargs: dict[str, Any] = dict(
        num_layers=n_layers,
        hidden_size=int(_get(hf_config, "hidden_size")),
        ffn_hidden_size=int(_get(hf_config, "intermediate_size")),
        num_attention_heads=n_heads,
        num_query_groups=n_kv,
        kv_channels=_head_dim(hf_config),
        normalization="RMSNorm",
        layernorm_epsilon=float(_get(hf_config, "rms_norm_eps", 1e-6)),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=bool(_get(hf_config, "attention_bias", False)),
        qk_layernorm=model_type in ("qwen3", "qwen3_moe"),
        hidden_dropout=0.0,
        attention_dropout=float(_get(hf_config, "attention_dropout", 0.0) or 0.0),
        init_method_std=float(_get(hf_config, "initializer_range", 0.02)),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # HF computes softmax in fp32 regardless of dtype.
        attention_softmax_in_fp32=True,
        # CPU: allocate on CPU (also makes init independent of TP: the full master weight is drawn
        # from the replicated default generator and then split).
        use_cpu_initialization=platform.is_cpu_mode(),
        # Fused kernels come from TE/apex; the local spec runs the plain PyTorch paths.
        bias_activation_fusion=te,
        bias_dropout_fusion=te,
        masked_softmax_fusion=te,
        apply_rope_fusion=te,
        persist_layer_norm=te,
        gradient_accumulation_fusion=False,  # needs megatron DDP main_grad + TE/apex
        cross_entropy_loss_fusion=False,
        # Interleaved PP over 2 ranks sends activations *and* grads to the same peer in one step;
        # batched isend/irecv then pairs them by posting order and swaps the two (seen with gloo:
        # wrong losses). The unbatched path puts the two directions on different groups.
        batch_p2p_comm=not (pp == 2 and vpp is not None),
    )
    if moe_provider.is_moe(hf_config):
        kwargs.update(moe_provider.moe_config_kwargs(hf_config, spec=spec, settings=moe))
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def get_layer_spec(config: Any, spec: Spec = "local", vp_stage: int | None = None):
    """Megatron layer spec: ``local`` (pure PyTorch), ``torch`` (PyTorch SDPA attention and
    params-dtype norms) or ``te`` (Transformer Engine, GPU). ``auto``: see :func:`resolve_spec`.
    ``local`` and ``torch`` give a ``TransformerBlockSubmodules`` for ``vp_stage``, since they
    also set the final norm (``megatron/norm.py``: norms that support sequence parallelism)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    spec = resolve_spec(spec)
    if config.num_moe_experts:
        return moe_provider.moe_block_spec(config, spec, vp_stage=vp_stage)
    if spec == "local":  # megatron's local layer with our norms (sequence parallelism)
        from rlrt_megatron.megatron.norm import LocalNorm, block_spec

        layer = get_gpt_layer_local_spec(
            qk_layernorm=config.qk_layernorm, normalization=config.normalization
        )
        return block_spec(config, layer, LocalNorm, vp_stage=vp_stage)
    if spec == "torch":
        from rlrt_megatron.megatron.attention import torch_block_spec

        return torch_block_spec(config, vp_stage=vp_stage)
    try:
        import transformer_engine  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "model.spec='te' needs Transformer Engine, which is not importable here "
            f"({e}); install the gpu extra: pip install 'rlrt-megatron[gpu]', or use "
            "model.spec=torch (GPU) / local (CPU)"
        ) from e
    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)


def build_model(
    hf_config: Any,
    *,
    tp: int = 1,
    pp: int = 1,
    spec: Spec = "local",
    params_dtype: torch.dtype = torch.float32,
    vpp: int | None = None,
    **config_overrides: Any,
) -> list:
    """The ``GPTModel`` chunks this rank holds (one, or ``vpp`` with interleaved pipelining).

    Needs :func:`rlrt_megatron.platform.init_distributed` first with the same ``tp``/``pp``.
    Mirrors ``megatron.training.training.get_model``: pre/post process from ``parallel_state``,
    TP attributes defaulted on every parameter, chunks moved to :func:`platform.device` and
    ``params_dtype`` (the local spec's torch norms are created in fp32; the torch spec creates
    them in ``params_dtype``). The chunks are not wrapped in ``Float16Module`` (it would return
    fp32 logits, see ``megatron/forward.py``).
    Each chunk gets ``true_vocab_size`` and ``padded_vocab_size`` attributes (module docstring).
    """
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel

    from rlrt_megatron.megatron import compat

    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "megatron parallel_state is not initialised: call "
            "rlrt_megatron.platform.init_distributed(tp, pp) before build_model"
        )
    cur_tp = parallel_state.get_tensor_model_parallel_world_size()
    cur_pp = parallel_state.get_pipeline_model_parallel_world_size()
    if (cur_tp, cur_pp) != (tp, pp):
        raise ValueError(
            f"build_model(tp={tp}, pp={pp}) but parallel_state was initialised with "
            f"tp={cur_tp}, pp={cur_pp}: pass the same sizes to init_distributed"
        )
    if vpp is not None and pp == 1:
        raise ValueError("vpp (virtual pipeline stages) needs pp > 1")
    cur_vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vpp != cur_vpp:
        raise ValueError(
            f"build_model(vpp={vpp}) but parallel_state has virtual pipeline size {cur_vpp}: "
            f"pass vpp to init_distributed"
        )

    ep = parallel_state.get_expert_model_parallel_world_size()
    etp = parallel_state.get_expert_tensor_parallel_world_size()
    moe_provider.check_parallel(hf_config, tp=tp, ep=ep, etp=etp)
    if moe_provider.is_moe(hf_config):
        config_overrides = {
            "expert_model_parallel_size": ep, "expert_tensor_parallel_size": etp,
            **config_overrides,
        }  # fmt: skip
    config = transformer_config_from_hf(
        hf_config, tp=tp, pp=pp, params_dtype=params_dtype, spec=spec, vpp=vpp,
        **config_overrides,
    )  # fmt: skip
    spec = resolve_spec(spec)
    vocab = int(_get(hf_config, "vocab_size"))
    padded = padded_vocab_size(vocab, tp)
    model_kwargs = gpt_model_kwargs_from_hf(hf_config)

    stages = [None] if vpp is None else list(range(vpp))
    chunks = []
    for vp_stage in stages:
        ignore_virtual = vp_stage is None
        model = GPTModel(
            config=config,
            transformer_layer_spec=get_layer_spec(config, spec, vp_stage=vp_stage),
            vocab_size=padded,
            pre_process=parallel_state.is_pipeline_first_stage(
                ignore_virtual=ignore_virtual, vp_stage=vp_stage
            ),
            post_process=parallel_state.is_pipeline_last_stage(
                ignore_virtual=ignore_virtual, vp_stage=vp_stage
            ),
            parallel_output=True,
            vp_stage=vp_stage,
            **model_kwargs,
        )
        if model_kwargs["rope_scaling"]:  # llama3 factors other than megatron's fixed ones
            compat.apply_llama3_rope(model, _rope_parameters(hf_config))
        for param in model.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        # Megatron creates the torch norms' weights in fp32 whatever params_dtype says (its
        # Float16Module casts them); cast here so bf16 runs in bf16 end to end (fp32 main params
        # and gradients live in the optimizer and DDP buffers, as in Megatron's training).
        model.to(device=platform.device(), dtype=params_dtype)
        model.true_vocab_size = vocab
        model.padded_vocab_size = padded
        chunks.append(model)
    return chunks


def true_vocab_size(model: Any) -> int:
    """The unpadded (HF) vocab size of a chunk built by :func:`build_model`.

    Unwraps DDP / Float16Module (``.module``) to find the attribute.
    """
    m = model
    while not hasattr(m, "true_vocab_size") and hasattr(m, "module"):
        m = m.module
    if not hasattr(m, "true_vocab_size"):
        raise AttributeError(
            f"{type(model).__name__} has no true_vocab_size: build it with "
            "rlrt_megatron.megatron.model.build_model"
        )
    return int(m.true_vocab_size)
