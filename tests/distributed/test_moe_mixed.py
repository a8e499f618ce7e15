"""A Qwen3-MoE with dense layers between its MoE layers (`mlp_only_layers`), in real gloo
processes: 4 layers, layer 0 dense (`intermediate_size` SwiGLU), layers 1-3 MoE.

- HF -> Megatron -> HF is bit-exact (dense MLP names in layer 0, router / expert names in the
  others; megatron's per-layer checkpoint keys);
- at EP=1, EP=2, EP=2 x TP=2, PP=2 and PP=2 x EP=2 the logits match transformers (< 1e-4) and
  `iter_hf_weights` reproduces the HF tensors exactly; a save at EP=2 x TP=2 exports to the same
  HF tensors and loads at EP=1 (test_moe's workers, on this model).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from test_moe import _check_layouts, _convert, _layouts_worker
from test_parity import load_hf_tensors

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

MIXED = {"mlp_only_layers": [0]}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("moe_mixed")
    run_distributed(_convert, 1, str(root), 4, MIXED)
    return root


def test_mixed_moe_round_trip_is_bit_exact(mixed) -> None:
    a, b = load_hf_tensors(mixed / "hf"), load_hf_tensors(mixed / "back")
    assert sorted(a) == sorted(b)
    assert "model.layers.0.mlp.gate_proj.weight" in a  # dense layer 0
    assert "model.layers.0.mlp.gate.weight" not in a
    assert (
        "model.layers.1.mlp.gate.weight" in a and "model.layers.3.mlp.experts.7.up_proj.weight" in a
    )
    assert "model.layers.1.mlp.gate_proj.weight" not in a
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mixed_moe_parity_export_and_reshard_at_every_layout(mixed) -> None:
    _check_layouts(run_distributed(_layouts_worker, 4, str(mixed)))
