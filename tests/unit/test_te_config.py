"""Transformer Engine / FP8 config plumbing (CPU): field mapping, validation, clear errors."""

from __future__ import annotations

import pytest
import torch

from rlrt_megatron.megatron import te
from rlrt_megatron.megatron.te import (
    FP8Config,
    MissingGPUExtraError,
    fp8_transformer_kwargs,
    precision_ddp_kwargs,
    precision_optimizer_kwargs,
    precision_transformer_kwargs,
)


def test_fp8_off_by_default_maps_to_nothing():
    assert fp8_transformer_kwargs(None) == {}
    assert fp8_transformer_kwargs(FP8Config()) == {}
    assert FP8Config().fp8_param is False


@pytest.mark.parametrize(
    "recipe, megatron_recipe", [("delayed", "delayed"), ("current", "tensorwise"),
                                ("blockwise", "blockwise"), ("mxfp8", "mxfp8")],
)  # fmt: skip
@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
def test_fp8_recipes_map_to_transformer_config_fields(recipe, megatron_recipe, fmt):
    kw = fp8_transformer_kwargs(FP8Config(enabled=True, format=fmt, recipe=recipe))
    assert kw["fp8"] == fmt and kw["fp8_recipe"] == megatron_recipe
    assert kw["fp8_param"] is False and kw["fp8_wgrad"] is True and kw["fp8_margin"] == 0
    if recipe == "delayed":
        assert kw["fp8_amax_history_len"] == 1024 and kw["fp8_amax_compute_algo"] == "max"
    else:  # amax history only means something for delayed scaling
        assert "fp8_amax_history_len" not in kw


def test_validation_messages_name_the_field():
    with pytest.raises(ValueError, match="fp8.format='e5m2'"):
        FP8Config(enabled=True, format="e5m2").validate()
    with pytest.raises(ValueError, match="fp8.recipe='fancy'"):
        FP8Config(enabled=True, recipe="fancy").validate()
    with pytest.raises(ValueError, match="fp8_param=True needs fp8.enabled"):
        fp8_transformer_kwargs(FP8Config(fp8_param=True))
    with pytest.raises(ValueError, match="model.spec=te"):
        fp8_transformer_kwargs(FP8Config(enabled=True), spec="local")
    with pytest.raises(ValueError, match="amax_history_len"):
        FP8Config(enabled=True, amax_history_len=0).validate()
    with pytest.raises(ValueError, match="params_dtype='int8'"):
        precision_transformer_kwargs("int8")


def test_kwargs_are_accepted_by_megatron_configs():
    """The dicts we build are real field names of megatron-core's dataclasses."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer import TransformerConfig

    fp8 = FP8Config(enabled=True, recipe="current", fp8_param=True)
    tc = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4,
        **precision_transformer_kwargs("bf16"), **fp8_transformer_kwargs(fp8),
    )  # fmt: skip
    assert tc.fp8 == "hybrid" and tc.fp8_recipe == "tensorwise" and tc.fp8_param is True
    assert tc.bf16 is True and tc.params_dtype == torch.bfloat16
    oc = OptimizerConfig(lr=1e-6, **precision_optimizer_kwargs("bf16", fp8))
    # bf16 params, fp32 master weights and Adam states in the distributed optimizer
    assert oc.bf16 and oc.use_distributed_optimizer and not oc.use_precision_aware_optimizer
    assert oc.main_params_dtype == torch.float32 and oc.exp_avg_dtype == torch.float32
    assert oc.fp8_recipe == "tensorwise"
    ddp = DistributedDataParallelConfig(**precision_ddp_kwargs(fp8))
    assert ddp.grad_reduce_in_fp32 and ddp.fp8_param_gather
    assert not DistributedDataParallelConfig(**precision_ddp_kwargs(None)).fp8_param_gather
    fp32 = TransformerConfig(
        num_layers=1, hidden_size=32, num_attention_heads=2, **precision_transformer_kwargs("fp32")
    )
    assert not fp32.bf16 and fp32.params_dtype == torch.float32


def test_missing_te_names_the_gpu_extra(monkeypatch):
    monkeypatch.setattr(te, "te_available", lambda: False)
    with pytest.raises(MissingGPUExtraError, match=r"model.spec=te.*pip install -e '\.\[gpu\]'"):
        te.require_transformer_engine()
    with pytest.raises(ImportError, match="gpu"):
        te.te_layer_spec()


def test_te_available_is_false_without_the_package():
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("transformer_engine installed")
    assert te.te_available() is False
