"""Qwen3-MoE pieces that need no process group (or one process): the provider's config, the
mapping table's MoE rules, the `torch` spec, config validation, the planner and Slurm checks."""

from __future__ import annotations

import pytest
import torch

from rlrt_megatron.convert import mapping
from rlrt_megatron.convert.tiny import tiny_config


def test_provider_maps_the_qwen3_moe_config_fields():
    from rlrt_megatron.megatron.model import transformer_config_from_hf
    from rlrt_megatron.megatron.moe.provider import (
        MoESettings,
        moe_config_kwargs,
        moe_layer_pattern,
    )

    hf = tiny_config("qwen3_moe")
    c = transformer_config_from_hf(hf, tp=1, pp=1, spec="local")
    assert (c.num_moe_experts, c.moe_router_topk, c.moe_ffn_hidden_size) == (8, 2, 32)
    assert c.moe_router_pre_softmax is False  # norm_topk_prob=True: softmax over the top-k
    assert c.moe_router_load_balancing_type == "none" and c.moe_aux_loss_coeff == 0.0
    assert c.moe_grouped_gemm is False and c.qk_layernorm and c.moe_layer_freq == 1
    # te: TE's grouped GEMM experts (a GPU config: TransformerConfig refuses TE fusions here)
    assert moe_config_kwargs(hf, spec="te")["moe_grouped_gemm"] is True
    on = transformer_config_from_hf(
        hf, tp=1, pp=1, spec="local", moe=MoESettings(aux_loss_coeff=1e-3, routing_replay=True)
    )
    assert on.moe_router_load_balancing_type == "aux_loss" and on.moe_enable_routing_replay
    hf.norm_topk_prob = False
    assert transformer_config_from_hf(hf, tp=1, pp=1).moe_router_pre_softmax is True
    hf.mlp_only_layers, hf.num_hidden_layers = [1], 4
    assert moe_layer_pattern(hf) == [1, 0, 1, 1]
    assert transformer_config_from_hf(hf, tp=1, pp=1).moe_layer_freq == [1, 0, 1, 1]
    with pytest.raises(ValueError, match="sigmoid router"):
        transformer_config_from_hf(hf, tp=1, pp=1, moe=MoESettings(expert_bias=True))


def test_ep_must_divide_the_experts():
    from rlrt_megatron.megatron.moe.provider import check_parallel

    check_parallel(tiny_config("qwen3_moe"), tp=1, ep=4, etp=None)
    with pytest.raises(ValueError, match="must divide the model's num_experts=8"):
        check_parallel(tiny_config("qwen3_moe"), tp=1, ep=3, etp=None)
    with pytest.raises(ValueError, match="dense"):
        check_parallel(tiny_config("qwen3"), tp=1, ep=2, etp=None)
    check_parallel(tiny_config("qwen3"), tp=2, ep=1, etp=2)  # megatron's default etp = tp


def test_mapping_has_per_expert_rules_in_both_directions():
    shape = mapping.model_shape(tiny_config("qwen3_moe").to_dict())
    assert (shape.num_experts, shape.moe_ffn) == (8, 32)
    entries = list(mapping.entries(shape))
    hf_names = [n for e in entries for n in e.hf_names()]
    assert "model.layers.0.mlp.experts.7.gate_proj.weight" in hf_names
    assert "model.layers.1.mlp.gate.weight" in hf_names
    assert not any(n.endswith("mlp.gate_proj.weight") for n in hf_names)  # no dense MLP
    fc1 = next(e for e in entries if e.expert == 3 and "gate_proj" in e.hf_names()[0])
    assert (
        fc1.megatron_name("local")
        == "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight"
    )
    assert fc1.megatron_name("te") == "decoder.layers.0.mlp.experts.linear_fc1.weight3"
    assert fc1.sharded_key("te") == fc1.sharded_key("local")
    assert fc1.stack_offsets(shape) == [(0, 0, 2), (1, 3, 8)]
    assert mapping.megatron_shape(fc1, shape) == (64, 64)
    g, u = torch.randn(32, 64), torch.randn(32, 64)
    fused = mapping.fuse(fc1.rule, [g, u], shape)
    back = mapping.unfuse(fc1.rule, fused, shape)
    assert torch.equal(back[0], g) and torch.equal(back[1], u)
    # mixed dense / MoE layers: tests/unit/test_moe_pattern.py


def test_torch_spec_moe_matches_local():
    from dist_utils import single_process_megatron

    with single_process_megatron():
        from rlrt_megatron.megatron.model import build_model

        hf = tiny_config("qwen3_moe")
        local = build_model(hf, spec="local")[0].eval()
        sdpa = build_model(hf, spec="torch")[0].eval()
        sdpa.load_state_dict(local.state_dict(), strict=False)
        assert "decoder.layers.1.mlp.router.weight" in dict(sdpa.named_parameters())
        ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
        pos = torch.arange(9).expand(2, 9)
        with torch.no_grad():
            a = local(ids, pos, attention_mask=None)
            b = sdpa(ids, pos, attention_mask=None)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_config_validation_names_the_moe_keys():
    from rlrt_megatron.config import ConfigError, TrainConfig

    moe = tiny_config("qwen3_moe").to_dict()
    cfg = TrainConfig()
    cfg.model.build_tiny = True
    cfg.parallel.ep = 3
    with pytest.raises(ConfigError, match=r"parallel.ep: 3 does not divide .*num_experts=8"):
        cfg.validate(hf_config=moe, world_size=3)
    cfg.parallel.ep, cfg.parallel.tp = 2, 2
    with pytest.raises(ConfigError, match=r"parallel.sequence_parallel: megatron trains MoE"):
        cfg.validate(hf_config=moe, world_size=4)
    for spec in ("local", "torch"):  # sequence parallelism runs on the CPU specs too
        cfg.model.spec, cfg.parallel.sequence_parallel = spec, True
        cfg.validate(hf_config=moe, world_size=4)
    cfg.model.spec, cfg.parallel.sequence_parallel, cfg.parallel.tp = "auto", False, 1
    cfg.validate(hf_config=moe, world_size=2)
    with pytest.raises(ConfigError, match=r"parallel.ep: pp \* ep \* etp = 2 must divide"):
        cfg.validate(hf_config=moe, world_size=3)
    with pytest.raises(ConfigError, match=r"parallel.ep: 2 .*needs a MoE model"):
        cfg.validate(hf_config=tiny_config("qwen3").to_dict(), world_size=2)
    cfg.model.moe.routing_replay = "rollout"
    cfg.validate(hf_config=moe, world_size=2)  # the local engine records the experts
    cfg.rollout.partial = True
    with pytest.raises(ConfigError, match=r"routing_replay: `rollout` needs whole rollouts"):
        cfg.validate(hf_config=moe, world_size=2)
    cfg.rollout.partial = False
    cfg.rollout.engine = "sglang"
    cfg.validate(hf_config=moe, world_size=2)  # SGLang's return_routed_experts


def test_plan_counts_experts_and_fits_the_30b_a3b_recipe():
    from rlrt_megatron.launch import plan_moe
    from rlrt_megatron.launch.plan import Layout, Settings, predict
    from rlrt_megatron.launch.plan_shapes import BUILTIN_SHAPES

    shape = BUILTIN_SHAPES["qwen3-30b-a3b"]
    # 48 layers x 128 experts x 3 x 2048 x 768 + routers: the 29B of Qwen3-30B-A3B's 30.5B
    assert plan_moe.expert_params(shape) == 48 * 128 * (3 * 2048 * 768 + 2048)
    s = Settings(tokens_per_microbatch=10240, row_len=10240, sglang=True, sglang_tp=4)
    fit = predict(shape, Layout(4, 8, 2, 2, ep=8, etp=1), s, 79.6)
    assert fit.fits and "expert optimizer (1/expert-dp 2)" in fit.rows
    # 1/pp of the layers, 1/ep of the experts, every router of those layers; bf16
    per_rank = 24 * 16 * 3 * 2048 * 768 + 24 * 128 * 2048
    assert fit.rows["expert weights (1/ep 8) + routers"] == per_rank * 2 / 2**30
    # EP halves the expert bytes per GPU
    ep4 = predict(shape, Layout(4, 8, 2, 2, ep=4, etp=1), s, 79.6)
    assert (
        ep4.rows["expert weights (1/ep 4) + routers"]
        > 1.9 * fit.rows["expert weights (1/ep 8) + routers"]
    )
    bad = predict(shape, Layout(4, 8, 2, 2, ep=3, etp=1), s, 79.6)
    assert not bad.fits and any("does not divide the 128 experts" in p for p in bad.problems)


def test_plan_cli_and_slurm_pass_ep_through():
    import subprocess
    import sys
    from pathlib import Path

    from rlrt_megatron.launch.job import SlurmJob, SlurmJobError

    repo = Path(__file__).resolve().parents[2]
    p = subprocess.run(
        [sys.executable, "-m", "rlrt_megatron.cli", "plan", "--recipe", "qwen3_30b_a3b_rlrt",
         "--nodes", "4", "--gpus-per-node", "8", "--gpu", "h100-80gb"],
        capture_output=True, text=True, timeout=300, cwd=repo,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip().splitlines()[-1].startswith("fits=yes ")
    assert "(ep 8, etp 1)" in p.stdout and "MoE activations + dispatcher buffers" in p.stdout
    home = "/shared/rlrt-megatron"
    job = SlurmJob("qwen3_30b_a3b_grpo", nodes=4, gpus_per_node=8, home=home)
    assert "experts ep 8 x etp 1" in job.describe(job.validate())
    with pytest.raises(SlurmJobError, match=r"parallel.pp \* parallel.ep \* parallel.etp = 16"):
        SlurmJob("qwen3_30b_a3b_grpo", nodes=1, gpus_per_node=8, home=home).validate()


def test_local_engine_takes_per_expert_weights(tmp_path):
    """The weight stream names experts per expert (as checkpoints and SGLang do); transformers 5
    keeps them fused: each lands in its slice, and a missing or mis-shaped one is refused."""
    from safetensors.torch import load_file

    from rlrt_megatron.convert.tiny import make_tiny_model
    from rlrt_megatron.rollout.local import LocalEngine

    hf = make_tiny_model(tmp_path / "hf", arch="qwen3_moe", seed=2)
    eng = LocalEngine(str(hf))
    new = {k: v + 1.0 for k, v in load_file(hf / "model.safetensors").items()}
    eng.update_weights(new.items(), version=3)
    experts = eng.model.model.layers[1].mlp.experts
    p = "model.layers.1.mlp.experts.5."
    assert torch.equal(experts.gate_up_proj[5, :32], new[p + "gate_proj.weight"])
    assert torch.equal(experts.gate_up_proj[5, 32:], new[p + "up_proj.weight"])
    assert torch.equal(experts.down_proj[5], new[p + "down_proj.weight"])
    assert eng.weight_version == 3
    bad = {**new, p + "down_proj.weight": torch.zeros(32, 64)}
    with pytest.raises(ValueError, match=r"experts.5.down_proj.weight: expected \(64, 32\)"):
        eng.update_weights(bad.items(), version=4)
