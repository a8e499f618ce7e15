"""Routing replay (R3) on a Qwen3-MoE whose routers are near ties.

The "engine" is the transformers model in bfloat16 (as rollout engines sample), recording each
token's top-k experts per layer (`rollout.moe_routing.RoutedExperts`); the "trainer" is the
Megatron model in fp32 with the same weights. With near-tie routers the two route many tokens
differently, and the log-probs drift apart. With replay the trainer's forward uses exactly the
engine's experts (asserted per token and layer from megatron's routing maps), the router still
gets a gradient through the gate values, and the log-prob gap shrinks.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import single_process_megatron

SEQ = 48


def _near_tie_model(root):
    """Tiny Qwen3-MoE whose experts' router rows differ by 2% of a shared row: every token's
    router logits are nearly equal, so bf16 rounding flips top-k choices."""
    from safetensors.torch import load_file, save_file

    from rlrt_megatron.convert.tiny import make_tiny_model

    hf = make_tiny_model(root / "hf", arch="qwen3_moe", vocab_size=512, seed=7)
    path = hf / "model.safetensors"
    tensors = load_file(path)
    g = torch.Generator().manual_seed(0)
    for name, t in tensors.items():
        if name.endswith("mlp.gate.weight"):
            base = torch.randn(1, t.shape[1], generator=g)
            tensors[name] = base + 0.02 * torch.randn(t.shape, generator=g)
    save_file(tensors, path, metadata={"format": "pt"})
    return hf


def _logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), -1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]


def test_replay_uses_the_engine_experts_and_shrinks_the_logprob_gap(tmp_path):
    from transformers import AutoModelForCausalLM

    from rlrt_megatron.convert.hf_to_megatron import hf_to_megatron
    from rlrt_megatron.convert.load import load_checkpoint_into_model
    from rlrt_megatron.megatron.model import build_model
    from rlrt_megatron.megatron.moe import routing
    from rlrt_megatron.megatron.moe.provider import MoESettings
    from rlrt_megatron.rollout.moe_routing import RoutedExperts

    hf_dir = _near_tie_model(tmp_path)
    ids = torch.randint(0, 512, (1, SEQ), generator=torch.Generator().manual_seed(1))
    engine = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad(), RoutedExperts(engine) as rec:
        engine_lp = _logprobs(engine(ids).logits, ids)
    routed = rec.per_token()  # [SEQ, layers, k]
    assert routed.shape == (SEQ, 2, 2)

    with single_process_megatron():
        hf_to_megatron(hf_dir, tmp_path / "mc", show_progress=False)
        (model,) = build_model(engine.config, moe=MoESettings(routing_replay=True))
        load_checkpoint_into_model([model], tmp_path / "mc")
        chosen: dict[int, torch.Tensor] = {}

        def hook(layer):
            def fn(module, args, output):
                chosen[layer] = output[1].detach().clone()  # routing map [tokens, experts]

            return fn

        handles = [r.register_forward_hook(hook(i)) for i, r in routing.routers([model])]
        pos = torch.arange(SEQ)[None]

        def trainer_logprobs() -> torch.Tensor:
            logits = model(ids, pos, attention_mask=None)
            return _logprobs(logits[..., :512], ids)

        # without replay: the trainer routes itself (the engine's choices differ on near ties)
        with torch.no_grad():
            free_lp = trainer_logprobs()
        free = {i: chosen[i].clone() for i in chosen}
        engine_map = {
            i: torch.zeros(SEQ, 8, dtype=torch.bool).scatter_(1, routed[:, i], True)
            for i in range(2)
        }
        flips = sum(int((free[i] != engine_map[i]).any(1).sum()) for i in range(2))
        assert flips > 0, "the near-tie router should route some tokens differently"

        # with replay (training mode: the router gets its gradient through the gate values)
        model.train()
        routing.set_replay([model], {i: routed[:, i] for i in range(2)})
        replay_lp = trainer_logprobs()
        for i in range(2):
            assert torch.equal(chosen[i], engine_map[i]), f"layer {i}: not the engine's experts"
        (-replay_lp.sum()).backward()
        router_grads = [r.weight.grad for _, r in routing.routers([model])]
        assert all(g is not None and float(g.abs().sum()) > 0 for g in router_grads)
        routing.clear_replay([model])
        for h in handles:
            h.remove()

    free_gap = float((free_lp - engine_lp).abs().mean())
    replay_gap = float((replay_lp.detach() - engine_lp).abs().mean())
    print(f"tokens routed differently: {flips}; logprob_abs_diff without replay {free_gap:.4g}, "
          f"with replay {replay_gap:.4g}")  # fmt: skip
    assert replay_gap < free_gap
    assert replay_gap == pytest.approx(replay_gap)  # finite
