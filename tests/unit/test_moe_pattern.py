"""Mixed dense / MoE layer patterns of Qwen3-MoE (`mlp_only_layers`, `decoder_sparse_step`):
the pattern as transformers builds it, megatron's config, the mapping table's per-layer rules and
keys, the model megatron builds, the refusals, and the planner's counts. The conversion round
trip and parity at EP 1/2 are in tests/distributed/test_moe_mixed.py."""

from __future__ import annotations

import pytest

from rlrt_megatron.convert import mapping
from rlrt_megatron.convert.tiny import tiny_config

PATTERNS = [  # (HF fields, layers, MoE (1) / dense (0) per layer)
    ({"decoder_sparse_step": 2}, 4, [0, 1, 0, 1]),
    ({"mlp_only_layers": [0]}, 4, [0, 1, 1, 1]),
    ({"mlp_only_layers": [1], "decoder_sparse_step": 3}, 6, [0, 0, 1, 0, 0, 1]),
    ({"mlp_only_layers": [0, 5], "decoder_sparse_step": 1}, 6, [0, 1, 1, 1, 1, 0]),
    ({}, 2, [1, 1]),
]


def _hf(fields: dict, layers: int):
    return tiny_config("qwen3_moe", num_layers=layers, overrides=fields)


@pytest.mark.parametrize(("fields", "layers", "pattern"), PATTERNS)
def test_pattern_is_the_one_transformers_builds(fields, layers, pattern):
    from transformers import Qwen3MoeForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from rlrt_megatron.megatron.model import transformer_config_from_hf
    from rlrt_megatron.megatron.moe.provider import megatron_layer_pattern, moe_layer_pattern

    hf = _hf(fields, layers)
    built = [
        int(isinstance(layer.mlp, Qwen3MoeSparseMoeBlock))
        for layer in Qwen3MoeForCausalLM(hf).model.layers
    ]
    assert built == pattern == moe_layer_pattern(hf)
    c = transformer_config_from_hf(hf, tp=1, pp=1)
    assert megatron_layer_pattern(c.moe_layer_freq, c.num_layers) == pattern
    assert (c.ffn_hidden_size, c.moe_ffn_hidden_size) == (128, 32)  # dense vs expert SwiGLU
    shape = mapping.model_shape(hf.to_dict())
    assert [int(shape.is_moe_layer(i)) for i in range(layers)] == pattern
    assert shape.mixed == (0 in pattern)


def test_mapping_rules_and_keys_per_layer():
    shape = mapping.model_shape(_hf({"decoder_sparse_step": 2}, 4).to_dict())
    by_layer: dict = {}
    for e in mapping.entries(shape):
        by_layer.setdefault(e.layer, []).append(e)
    dense = [n for e in by_layer[0] for n in e.hf_names()]
    moe = [n for e in by_layer[1] for n in e.hf_names()]
    assert "model.layers.0.mlp.gate_proj.weight" in dense and not any("experts" in n for n in dense)
    assert "model.layers.0.mlp.gate.weight" not in dense
    assert (
        "model.layers.1.mlp.gate.weight" in moe
        and "model.layers.1.mlp.experts.7.down_proj.weight" in moe
    )
    assert not any(n.endswith("mlp.gate_proj.weight") for n in moe)
    # megatron's per-layer ("non-homogeneous") keys: no layer axis, experts stacked on axis 0
    fc1 = next(e for e in by_layer[3] if e.expert == 5 and e.rule.fuse == "gate_up")
    assert fc1.sharded_key("local") == "decoder.layers.3.mlp.experts.experts.linear_fc1.weight"
    assert fc1.stack_offsets(shape) == [(0, 5, 8)]
    norm = next(e for e in by_layer[2] if "post_attention" in e.hf_names()[0])
    assert norm.sharded_key("local") == "decoder.layers.2.pre_mlp_layernorm.weight"
    assert norm.sharded_key("te") == "decoder.layers.2.mlp.linear_fc1.layer_norm_weight"
    assert norm.stack_offsets(shape) == []
    assert mapping.megatron_shape(
        next(e for e in by_layer[2] if e.rule.fuse == "gate_up"), shape
    ) == (256, 64)
    renames = mapping.spec_key_map("te", "local")
    assert (
        mapping.rename_key("decoder.layers.2.self_attention.linear_qkv.layer_norm_weight", renames)
        == "decoder.layers.2.input_layernorm.weight"
    )
    # every layer MoE: the stacked layout as before
    uniform = mapping.model_shape(tiny_config("qwen3_moe").to_dict())
    e = next(e for e in mapping.entries(uniform) if e.expert == 3 and e.rule.fuse == "gate_up")
    assert e.stack_offsets(uniform) == [(0, 0, 2), (1, 3, 8)]


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"decoder_sparse_step": 0}, r"decoder_sparse_step=0: must be >= 1"),
        ({"mlp_only_layers": [0, 4]}, r"mlp_only_layers=\[0, 4\]: \[4\] not in 0..3"),
        ({"mlp_only_layers": [0, 1, 2, 3]}, r"no MoE layer .*convert it as a dense model"),
        ({"decoder_sparse_step": 5}, r"no MoE layer"),
    ],
)
def test_patterns_that_cannot_be_built_are_refused_by_name(fields, match):
    from rlrt_megatron.megatron.model import transformer_config_from_hf

    hf = tiny_config("qwen3_moe", num_layers=4).to_dict() | fields
    with pytest.raises(ValueError, match=match):
        mapping.model_shape(hf)
    with pytest.raises(ValueError, match=match):
        transformer_config_from_hf(hf, tp=1, pp=1)


def test_megatron_builds_dense_and_moe_layers_under_the_mapping_names():
    from dist_utils import single_process_megatron

    shape = mapping.model_shape(_hf({"decoder_sparse_step": 2}, 4).to_dict())
    want = {
        e.megatron_name("local"): mapping.megatron_shape(e, shape) for e in mapping.entries(shape)
    }
    with single_process_megatron():
        from rlrt_megatron.megatron.model import build_model

        for spec in ("local", "torch"):
            (model,) = build_model(_hf({"decoder_sparse_step": 2}, 4), spec=spec)
            got = {n: tuple(p.shape) for n, p in model.named_parameters()}
            got["embedding.word_embeddings.weight"] = (512, 64)  # (padded rows: 512 already)
            assert got == want, spec
            routed = [hasattr(layer.mlp, "router") for layer in model.decoder.layers]
            assert routed == [False, True, False, True]


def test_planner_counts_dense_and_moe_layers_apart():
    from transformers import Qwen3MoeForCausalLM

    from rlrt_megatron.launch import plan_moe
    from rlrt_megatron.launch.plan import Layout, Settings, predict
    from rlrt_megatron.launch.plan_shapes import ModelShape, stage_params

    hf = _hf({"mlp_only_layers": [0]}, 4)
    shape = ModelShape.from_hf(hf.to_dict())
    assert (shape.moe_layers(), shape.dense_layers, shape.ffn) == (3, (0,), 128)
    assert (shape.moe_layers(2, 0), shape.moe_layers(2, 1)) == (1, 2)
    # every parameter transformers allocates: dense part per stage + experts and routers
    n_hf = sum(p.numel() for p in Qwen3MoeForCausalLM(hf).parameters())
    dense_part = sum(p[0] for p in stage_params(shape, 1, 1, 0))
    assert dense_part + plan_moe.expert_params(shape) == n_hf
    assert plan_moe.expert_params(shape) == 3 * 8 * (3 * 64 * 32 + 64)
    # pp = 2: stage 1 holds two MoE layers' experts, stage 0 one (and the dense MLP)
    per_stage = [
        plan_moe.moe_static_bytes(shape, world=2, pp=2, ep=1, etp=1, param_bytes=2,
                                  distributed=False, stage=k)["experts"]
        for k in range(2)
    ]  # fmt: skip
    assert per_stage == [1 * 8 * 3 * 64 * 32, 2 * 8 * 3 * 64 * 32]
    s0, s1 = (sum(p[0] for p in stage_params(shape, 1, 2, k)) for k in range(2))
    # the embedding and the last stage's tied LM head copy cancel: layer 0's MLP - final norm
    assert s0 - s1 == 3 * 64 * 128 - 64
    fit = predict(shape, Layout(1, 2, 1, 2, ep=1, etp=1), Settings(tokens_per_microbatch=256), 80)
    assert not fit.problems and fit.fits
