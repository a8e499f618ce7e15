"""Transformer Engine parameter names on CPU (no TE needed): the mapping table against the names
megatron-core's TE layer spec gives, TE-named state dicts <-> HF bit for bit (with the FP8
`_extra_state` entries a TE-trained checkpoint carries), and a TE-named checkpoint loading into
the local spec."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed

from rlrt_megatron.convert import mapping
from rlrt_megatron.convert.tiny import tiny_config

# What megatron-core 0.16's get_gpt_layer_with_transformer_engine_spec builds per layer:
# input_layernorm / pre_mlp_layernorm are IdentityOp, the norm weights live in the fused
# TELayerNormColumnParallelLinear as `layer_norm_weight` (RMSNorm: no `layer_norm_bias`);
# q/k norms are TENorm modules with a plain `weight`. Every TE module also has `_extra_state`.
TE_LAYER_PARAMS = [
    "self_attention.linear_qkv.layer_norm_weight",
    "self_attention.linear_qkv.weight",
    "self_attention.q_layernorm.weight",
    "self_attention.k_layernorm.weight",
    "self_attention.linear_proj.weight",
    "mlp.linear_fc1.layer_norm_weight",
    "mlp.linear_fc1.weight",
    "mlp.linear_fc2.weight",
]
TE_EXTRA_STATE = [
    "self_attention.linear_qkv._extra_state",
    "self_attention.core_attention._extra_state",
    "self_attention.linear_proj._extra_state",
    "mlp.linear_fc1._extra_state",
    "mlp.linear_fc2._extra_state",
]
CONFIGS = {
    "qwen3_tied": dict(arch="qwen3", tied=True),
    "qwen3_untied": dict(arch="qwen3", tied=False),
    "llama3_untied": dict(arch="llama", tied=False),
}


def _shape(arch: str, tied: bool) -> mapping.ModelShape:
    return mapping.model_shape(tiny_config(arch, vocab_size=512, tied=tied).to_dict())


def _te_names(shape: mapping.ModelShape) -> set[str]:
    names = {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight"}
    if not shape.tied:
        names.add("output_layer.weight")
    for i in range(shape.num_layers):
        for p in TE_LAYER_PARAMS:
            if "q_layernorm" in p or "k_layernorm" in p:
                if not shape.qk_norm:
                    continue
            names.add(f"decoder.layers.{i}.{p}")
    return names


def _random_hf(shape: mapping.ModelShape, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        n: torch.randn(s, generator=g).to(dtype)
        for n, s in mapping.expected_hf_shapes(shape).items()
    }


def _extra_state() -> io.BytesIO:
    buf = io.BytesIO()
    torch.save({"scale_fwd": torch.ones(3), "amax_history_fwd": torch.zeros(16, 3)}, buf)
    buf.seek(0)
    return buf  # what TE's get_extra_state returns


@pytest.mark.parametrize("name", list(CONFIGS))
def test_table_gives_exactly_the_te_spec_names(name):
    shape = _shape(**CONFIGS[name])
    te = {e.megatron_name("te") for e in mapping.entries(shape)}
    assert te == _te_names(shape)
    local = {e.megatron_name("local") for e in mapping.entries(shape)}
    assert local != te and len(local) == len(te)
    assert mapping.detect_spec(sorted(te)) == "te" and mapping.detect_spec(sorted(local)) == "local"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_te_state_dict_to_hf_and_back_is_bit_exact(name, dtype):
    shape = _shape(**CONFIGS[name])
    hf = _random_hf(shape, dtype)
    # HF -> a TE-named state dict, as a TE model's state_dict() holds it (plus FP8 metadata)
    te_sd: dict[str, object] = {}
    for e in mapping.entries(shape):
        te_sd[e.megatron_name("te")] = mapping.fuse(e.rule, [hf[n] for n in e.hf_names()], shape)
    for i in range(shape.num_layers):
        for p in TE_EXTRA_STATE:
            te_sd[f"decoder.layers.{i}.{p}"] = _extra_state()
    # TE state dict -> HF: the spec is detected from the names, _extra_state is not a weight
    spec = mapping.detect_spec(list(te_sd))
    assert spec == "te"
    back = {}
    for e in mapping.entries(shape):
        t = te_sd[e.megatron_name(spec)]
        for n, part in zip(e.hf_names(), mapping.unfuse(e.rule, t, shape), strict=True):
            back[n] = part
    assert sorted(back) == sorted(hf)
    for n in hf:
        assert back[n].dtype == dtype and torch.equal(back[n], hf[n]), n
    # TE names -> local names -> TE names (sharded keys: the layer index dropped)
    to_local, to_te = mapping.spec_key_map("te", "local"), mapping.spec_key_map("local", "te")
    for e in mapping.entries(shape):
        te_key, local_key = e.sharded_key("te"), e.sharded_key("local")
        assert to_local.get(te_key, te_key) == local_key
        assert to_te.get(local_key, local_key) == te_key


def _load_te_ckpt_into_local(rank: int, world_size: int, root: str) -> dict:
    from rlrt_megatron import platform
    from rlrt_megatron.convert.hf_to_megatron import hf_to_megatron
    from rlrt_megatron.convert.io import read_hf_config
    from rlrt_megatron.convert.load import load_checkpoint_into_model
    from rlrt_megatron.megatron.model import build_model

    r = Path(root)
    hf_to_megatron(r / "hf", r / "mc_te", spec="te", show_progress=False)
    hf_to_megatron(r / "hf", r / "mc_local", spec="local", show_progress=False)
    platform.init_distributed(tp=1, pp=1)
    try:
        cfg = read_hf_config(r / "hf")
        a, b = build_model(cfg)[0], build_model(cfg)[0]
        load_checkpoint_into_model([a], r / "mc_te")
        load_checkpoint_into_model([b], r / "mc_local")
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        return {
            "same_names": sorted(pa) == sorted(pb),
            "unequal": [n for n in pa if not torch.equal(pa[n], pb[n])],
            "n": len(pa),
        }
    finally:
        platform.destroy_distributed()


@pytest.mark.distributed
def test_te_named_checkpoint_loads_into_the_local_spec(tmp_path):
    from rlrt_megatron.convert.tiny import make_tiny_model

    make_tiny_model(tmp_path / "hf", arch="qwen3", tied=True)
    out = run_distributed(_load_te_ckpt_into_local, 1, str(tmp_path))[0]
    assert out["same_names"] and out["n"] > 0 and out["unequal"] == [], out
