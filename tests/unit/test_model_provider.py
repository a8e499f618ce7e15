"""HF config -> megatron TransformerConfig / GPTModel arguments (no process group needed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, Qwen3Config

from rlrt_megatron.megatron.model import (
    get_layer_spec,
    gpt_model_kwargs_from_hf,
    padded_vocab_size,
    transformer_config_from_hf,
    true_vocab_size,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _qwen3(**kw) -> Qwen3Config:
    base = dict(
        vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-5,
        max_position_embeddings=256, rope_theta=1_000_000.0, tie_word_embeddings=True,
    )  # fmt: skip
    base.update(kw)
    return Qwen3Config(**base)


def _llama3(**kw) -> LlamaConfig:
    base = dict(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=16384,
        rope_theta=500_000.0, rope_scaling=dict(LLAMA3_ROPE), tie_word_embeddings=False,
    )  # fmt: skip
    base.update(kw)
    return LlamaConfig(**base)


@pytest.mark.parametrize(
    ("vocab", "tp", "expected"),
    [(1000, 1, 1024), (1000, 2, 1024), (1100, 2, 1280), (151936, 1, 151936), (128256, 8, 129024)],
)
def test_padded_vocab_size(vocab, tp, expected):
    padded = padded_vocab_size(vocab, tp)
    assert padded == expected
    assert padded % (128 * tp) == 0 and 0 <= padded - vocab < 128 * tp


def test_padded_vocab_size_rejects_nonpositive():
    with pytest.raises(ValueError, match="vocab_size"):
        padded_vocab_size(0, 1)


@pytest.mark.parametrize("tied", [True, False])
def test_qwen3_mapping(tied):
    hf = _qwen3(tie_word_embeddings=tied)
    cfg = transformer_config_from_hf(hf, tp=2, pp=1)
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (2, 64, 160)
    assert (cfg.num_attention_heads, cfg.num_query_groups) == (4, 2)
    assert cfg.kv_channels == 24  # Qwen3 head_dim, not hidden/heads = 16
    assert cfg.normalization == "RMSNorm" and cfg.layernorm_epsilon == 1e-5
    assert cfg.qk_layernorm and cfg.gated_linear_unit and cfg.activation_func is F.silu
    assert not cfg.add_bias_linear and not cfg.add_qkv_bias
    assert cfg.hidden_dropout == 0.0 and cfg.attention_dropout == 0.0
    assert cfg.tensor_model_parallel_size == 2 and cfg.params_dtype == torch.float32
    assert cfg.use_cpu_initialization == (not torch.cuda.is_available())
    kw = gpt_model_kwargs_from_hf(hf)
    assert kw["share_embeddings_and_output_weights"] is tied
    assert kw["rotary_base"] == 1_000_000.0 and kw["rope_scaling"] is False
    assert kw["position_embedding_type"] == "rope" and kw["max_sequence_length"] == 256


def test_bf16_and_overrides():
    cfg = transformer_config_from_hf(
        _qwen3(), tp=1, pp=2, params_dtype=torch.bfloat16, recompute_granularity="full",
        recompute_method="uniform", recompute_num_layers=1,
    )  # fmt: skip
    assert cfg.bf16 and not cfg.fp16 and cfg.params_dtype == torch.bfloat16
    assert cfg.pipeline_dtype == torch.bfloat16 and cfg.recompute_granularity == "full"


def test_llama3_mapping_with_rope_scaling():
    hf = _llama3()
    cfg = transformer_config_from_hf(hf, tp=2, pp=1)
    assert not cfg.qk_layernorm and cfg.kv_channels == 8 and cfg.num_query_groups == 2
    kw = gpt_model_kwargs_from_hf(hf)
    assert kw["rope_scaling"] is True and kw["rope_scaling_factor"] == 8.0
    assert kw["rotary_base"] == 500_000.0 and kw["share_embeddings_and_output_weights"] is False


def test_llama3_rope_frequencies_match_transformers():
    """Megatron's RotaryEmbedding with our kwargs reproduces transformers' llama3 inv_freq."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = _llama3(hidden_size=512, num_attention_heads=4)  # head_dim 128 spans all three bands
    kw = gpt_model_kwargs_from_hf(hf)
    rope = RotaryEmbedding(
        kv_channels=128, rotary_percent=1.0, rotary_base=kw["rotary_base"],
        rope_scaling=kw["rope_scaling"], rope_scaling_factor=kw["rope_scaling_factor"],
        use_cpu_initialization=True,
    )  # fmt: skip
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    unscaled = 1.0 / (500_000.0 ** (torch.arange(0, 128, 2).float() / 128))
    assert not torch.allclose(ref, unscaled)  # the scaling is really exercised
    torch.testing.assert_close(rope.inv_freq, ref.float(), rtol=1e-6, atol=0)


def test_config_json_dict_with_legacy_rope_keys():
    hf = {
        "model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "rope_scaling": {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    }  # fmt: skip
    cfg = transformer_config_from_hf(hf, tp=1, pp=1)
    assert cfg.kv_channels == 16 and cfg.layernorm_epsilon == 1e-5
    kw = gpt_model_kwargs_from_hf(hf)
    assert kw["rope_scaling"] and kw["rope_scaling_factor"] == 32.0
    assert kw["rotary_base"] == 10000.0 and not kw["share_embeddings_and_output_weights"]


def test_unsupported_architecture_names_model_type():
    with pytest.raises(ValueError, match=r"model_type='mistral'.*qwen3, llama"):
        transformer_config_from_hf({"model_type": "mistral"}, tp=1, pp=1)


@pytest.mark.parametrize(("tp", "key"), [(3, "num_attention_heads"), (4, "num_key_value_heads")])
def test_tp_must_divide_heads(tp, key):
    with pytest.raises(ValueError, match=f"tp={tp}.*{key}"):
        transformer_config_from_hf(_qwen3(), tp=tp, pp=1)


def test_pp_must_divide_layers():
    with pytest.raises(ValueError, match="num_hidden_layers=2.*pp\\*vpp=4"):
        transformer_config_from_hf(_qwen3(), tp=1, pp=2, vpp=2)


@pytest.mark.parametrize("spec", ["local", "torch"])
def test_cpu_specs_take_sequence_parallel_and_mark_their_norms(spec):
    """Every norm of a local / torch layer marks its weight `sequence_parallel`, so megatron's
    finalize_model_grads sums its gradient over TP (the block's final norm is the same class:
    `norm.block_spec`)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from rlrt_megatron.megatron.attention import torch_layer_spec
    from rlrt_megatron.megatron.norm import LocalNorm, TorchNorm, swap_norms

    cfg = transformer_config_from_hf(_qwen3(), tp=2, pp=1, spec=spec, sequence_parallel=True)
    local = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    layer = swap_norms(local, LocalNorm) if spec == "local" else torch_layer_spec(local)
    sub = layer.submodules
    attn = sub.self_attention.submodules
    norms = [sub.input_layernorm, sub.pre_mlp_layernorm, attn.q_layernorm, attn.k_layernorm]
    assert set(norms) == {LocalNorm if spec == "local" else TorchNorm}
    norm = build_module(norms[0], config=cfg, hidden_size=8, eps=1e-6)
    assert isinstance(norm, torch.nn.RMSNorm) and norm.weight.sequence_parallel is True
    plain = transformer_config_from_hf(_qwen3(), tp=2, pp=1, spec=spec)
    assert build_module(norms[0], config=plain, hidden_size=8).weight.sequence_parallel is False


def test_unsupported_rope_variants():
    with pytest.raises(ValueError, match="yarn"):
        gpt_model_kwargs_from_hf(
            {"model_type": "qwen3", "max_position_embeddings": 128,
             "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
        )  # fmt: skip


def test_local_spec_names_and_te_error():
    from dist_utils import single_process_megatron

    cfg = transformer_config_from_hf(_qwen3(), tp=1, pp=1)
    with single_process_megatron(seed=7):  # the block spec counts this stage's layers
        spec = get_layer_spec(cfg, "local")
    attn = spec.layer_specs[0].submodules.self_attention.submodules
    assert attn.q_layernorm is not None and attn.k_layernorm is not None
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"rlrt-megatron\[gpu\]"):
            get_layer_spec(cfg, "te")
    with pytest.raises(ValueError, match="model.spec"):
        get_layer_spec(cfg, "fast")


def test_true_vocab_size_unwraps():
    inner = torch.nn.Linear(1, 1)
    inner.true_vocab_size = 1000
    outer = torch.nn.Module()
    outer.module = inner
    assert true_vocab_size(outer) == 1000
    with pytest.raises(AttributeError, match="build_model"):
        true_vocab_size(torch.nn.Linear(1, 1))
