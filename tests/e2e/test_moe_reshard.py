"""Reshardable MoE checkpoints: the tiny Qwen3-MoE (8 experts, top-2) trained 3 steps at EP=2
(two gloo processes, 4 experts each, DP=2), saved, and resumed at EP=1 (the same two processes:
every expert on each, DP=2), with the plain and the distributed optimizer, as
`tests/e2e/test_reshard.py` does for TP / PP:

* right after loading, the weights and the Adam state (both moments, the step, fp32 main
  params) of every expert and router, re-saved at EP=1, equal the EP=2 save bit for bit
  (full tensors through `dist_checkpointing.load_plain_tensors`);
* one optimizer step at EP=1 gives the uninterrupted EP=2 run's weights and Adam moments (to
  float-summation noise), and the losses of the two steps after the load agree;
* the trainer state records the EP size, and the load logs the reshard (`ep 2 -> 1`).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from dist_utils import run_distributed
from test_reshard import ROWS, VOCAB, _step, flat_tensors

pytestmark = [pytest.mark.e2e, pytest.mark.distributed, pytest.mark.slow]

IT, IT_NEXT = "iter_0000003", "iter_0000004"
STEP_RTOL = 1e-5  # as test_reshard: one step's float-summation noise at another layout


def _policy(ep: int, dist_opt: bool):
    from rlrt_megatron import platform
    from rlrt_megatron.config import OptimizerConfig
    from rlrt_megatron.convert.tiny import tiny_config
    from rlrt_megatron.megatron.train_step import Policy

    platform.init_distributed(1, 1, ep=ep, seed=5)
    optim = OptimizerConfig(lr=1e-2, schedule="cosine", warmup_steps=2, min_lr=1e-3)
    return Policy(
        tiny_config("qwen3_moe", vocab_size=VOCAB), tp=1, pp=1, optim=optim, total_steps=10,
        use_distributed_optimizer=dist_opt,
    )  # fmt: skip


def _layout(policy, ep: int) -> dict:
    return {"tp": 1, "pp": 1, "dp": policy.dp_size, "ep": ep, "etp": 1, "global_batch": ROWS}


def _worker(rank: int, world: int, root: str, dist_opt: bool) -> dict:
    from rlrt_megatron.trainer.checkpoint import Checkpointer

    out: dict = {"loss": {}, "lr": {}, "log": []}
    policy = _policy(2, dist_opt)
    for c in policy.chunks:  # decisive routers: no top-k near ties for the sums to flip
        for layer in c.decoder.layers:
            layer.mlp.router.weight.data.mul_(25.0)
    policy.sync_main_params()
    for s in (1, 2, 3):
        _step(policy, s)
    ck = Checkpointer(os.path.join(root, "ref"), keep_last=0)
    state = {"scheduler": policy.scheduler.state_dict()}
    ck.save(3, policy.model, policy.optimizer, state, layout=_layout(policy, 2))

    def step_and_save(name: str, ep: int) -> None:
        loss4 = _step(policy, 4)
        Checkpointer(os.path.join(root, name + "_next"), keep_last=0).save(
            4, policy.model, policy.optimizer, {}, layout=_layout(policy, ep)
        )
        out["loss"][name] = [loss4, _step(policy, 5)]
        out["lr"][name] = policy.optimizer.param_groups[0]["lr"]

    step_and_save("ref", 2)  # uninterrupted, at EP=2
    policy = _policy(1, dist_opt)
    loaded = ck.load(os.path.join(root, "ref", IT), policy.model, policy.optimizer,
                     layout=_layout(policy, 1), log=out["log"].append)  # fmt: skip
    policy.scheduler.load_state_dict(loaded["scheduler"])
    Checkpointer(os.path.join(root, "ep1"), keep_last=0).save(
        3, policy.model, policy.optimizer, {}, layout=_layout(policy, 1)
    )
    step_and_save("ep1", 1)
    return out


def _compare(rank: int, world: int, root: str) -> dict:
    from megatron.core import dist_checkpointing

    from rlrt_megatron import platform

    platform.init_distributed(1, 1)

    def plain(name: str, it: str = IT) -> dict[str, torch.Tensor]:
        loaded = dist_checkpointing.load_plain_tensors(os.path.join(root, name, it, "dist"))
        # (the Adam step is a common entry under each EP's optimizer structure: compared
        # through the trainer state's `optimizer_adam_step`)
        return {k: v for k, v in flat_tensors(loaded).items() if not k.endswith("/common_step")}

    def state(name: str, it: str = IT) -> dict:
        with open(os.path.join(root, name, it, "trainer_state.json")) as f:
            return json.load(f)

    ref, ep1 = plain("ref"), plain("ep1")
    out = {
        "keys": sorted(ref),
        "differ": sorted(
            k
            for k in set(ref) | set(ep1)
            if k not in ref or k not in ep1 or not torch.equal(ref[k], ep1[k])
        ),  # fmt: skip
        "step": [state(n)["optimizer_adam_step"] for n in ("ref", "ep1")],
        "layout_ep": [state(n)["layout"]["ep"] for n in ("ref", "ep1")],
    }
    ref_next, again = plain("ref_next", IT_NEXT), plain("ep1_next", IT_NEXT)
    assert sorted(again) == sorted(ref_next), sorted(set(again) ^ set(ref_next))[:8]
    worst: dict[str, float] = {}
    for k, t in ref_next.items():
        kind = next((m for m in ("exp_avg_sq", "exp_avg", "param") if f".{m}." in k), "weight")
        kind += "/expert" if ".experts." in k else ""
        rel = float((again[k] - t).abs().max() / t.abs().max().clamp_min(1e-30))
        worst[kind] = max(worst.get(kind, 0.0), rel)
    out["after_step"] = worst
    return out


@pytest.mark.parametrize("dist_opt", [False, True], ids=["optimizer", "distributed_optimizer"])
def test_moe_resume_at_another_ep(tmp_path, dist_opt):
    res = run_distributed(_worker, 2, str(tmp_path), dist_opt, timeout=900)
    (cmp,) = run_distributed(_compare, 1, str(tmp_path))
    keys = cmp["keys"]
    for part in ("mlp.experts.experts.linear_fc1", "mlp.router", ".exp_avg.", ".exp_avg_sq."):
        assert any(part in k for k in keys), (part, keys[:20])
    assert any(".experts." in k and ".exp_avg_sq." in k for k in keys), keys
    assert cmp["differ"] == []  # weights and Adam state of every expert, bit for bit
    assert cmp["step"] == [3.0, 3.0] and cmp["layout_ep"] == [2, 1]
    worst = cmp["after_step"]
    assert {"weight/expert", "exp_avg/expert", "exp_avg_sq/expert"} <= set(worst), worst
    assert max(worst.values()) < STEP_RTOL, worst
    ref, ep1 = res[0]["loss"]["ref"], res[0]["loss"]["ep1"]
    for i in (0, 1):
        assert abs(ep1[i] - ref[i]) / abs(ref[i]) < 1e-5, (ref, ep1)
    assert res[0]["lr"]["ep1"] == res[0]["lr"]["ref"]
    assert any("ep 2 -> 1" in m for m in res[0]["log"]), res[0]["log"]
