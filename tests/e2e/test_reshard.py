"""Reshardable checkpoints: train 3 steps at DP=2 (TP=1, PP=1), save, resume at TP=2 and at PP=2.

One 2-process gloo spawn per optimizer kind runs every layout in turn (megatron's model-parallel
groups re-initialised between them, as in `tests/distributed/test_parallel_invariance.py`):

* right after loading, the weights, the teacher copy and the Adam state (both moments, the step,
  fp32 main params) re-saved at the new layout equal the saved ones bit for bit, compared as
  full (gathered) tensors through `dist_checkpointing.load_plain_tensors`;
* one optimizer step taken on the resharded layout gives the uninterrupted run's weights and
  Adam moments (saved again and compared as full tensors, to float-summation noise), and the
  loss of the step after it agrees: a wrong optimizer reshard (moments, their step count) moves
  these, while the first step's loss depends on the weights alone;
* the LR schedule comes back, and a different global batch is refused with a clear message;
* a checkpoint in megatron's older `dp_reshardable` distributed-optimizer format is refused at
  another TP (both layouts and the fix named) and loads exactly at another DP size.
"""

from __future__ import annotations

import os

import pytest
import torch
from dist_utils import run_distributed

pytestmark = [pytest.mark.e2e, pytest.mark.distributed, pytest.mark.mcore019]

VOCAB = 256
ROWS = 4  # rollouts per mini-batch (the global batch): split over the data-parallel ranks
RESP = 6  # response tokens per rollout


def _batch(step: int) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(100 + step)
    seqs, starts = [], []
    for i in range(ROWS):
        prompt = 4 + (i + step) % 5
        seqs.append(torch.randint(3, VOCAB, (prompt + RESP,), generator=g).tolist())
        starts.append(prompt)
    return seqs, starts


def _step(policy, step: int) -> float:
    seqs, starts = _batch(step)
    per = ROWS // policy.dp_size
    rows = list(range(policy.dp_rank * per, (policy.dp_rank + 1) * per))
    total = float(ROWS * RESP)

    def loss_of(lp, _rows, _tk):
        # the whole mini-batch's token count, divided by DP since DDP averages gradients
        return -lp.sum() / (total / policy.dp_size), {}

    out = policy.train_minibatch(
        [seqs[r] for r in rows], [starts[r] for r in rows], rows, RESP, 64, loss_of
    )
    return out["loss"]


def _policy(tp: int, pp: int, dist_opt: bool):
    from rlrt_megatron import platform
    from rlrt_megatron.config import OptimizerConfig
    from rlrt_megatron.convert.tiny import tiny_config
    from rlrt_megatron.megatron.train_step import Policy

    platform.init_distributed(tp, pp, seed=5)
    optim = OptimizerConfig(lr=1e-2, schedule="cosine", warmup_steps=2, min_lr=1e-3)
    return Policy(
        tiny_config(vocab_size=VOCAB), tp=tp, pp=pp, optim=optim, total_steps=10,
        use_distributed_optimizer=dist_opt,
    )  # fmt: skip


def _layout(policy) -> dict:
    return {"tp": policy.tp, "pp": policy.pp, "dp": policy.dp_size, "global_batch": ROWS}


def _save_old_format(policy, root: str) -> None:
    """A checkpoint as saved before the `fully_reshardable` format: the distributed optimizer's
    `dp_reshardable` buckets, no format nor layout in the trainer state, the sizes in config."""
    import json

    import torch

    from rlrt_megatron.trainer import checkpoint

    checkpoint.OPTIMIZER_FORMAT = "dp_reshardable"
    try:
        cfg = {"parallel": {"tp": 1, "pp": 1, "use_distributed_optimizer": True}}
        path = checkpoint.Checkpointer(root, keep_last=0).save(
            3, policy.model, policy.optimizer, {}, config=cfg
        )
    finally:
        checkpoint.OPTIMIZER_FORMAT = "fully_reshardable"
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
        state.pop("optimizer_format")
        with open(os.path.join(path, "trainer_state.json"), "w") as f:
            json.dump(state, f)
    torch.distributed.barrier()


def _worker(rank: int, world: int, root: str, dist_opt: bool) -> dict:
    from rlrt_megatron.trainer.checkpoint import Checkpointer, ResumeError

    out: dict = {"loss": {}, "lr": {}}
    policy = _policy(1, 1, dist_opt)
    teacher = policy.make_teacher_copy()
    for s in (1, 2, 3):
        _step(policy, s)
    policy.ema_into(teacher, 0.5)  # a teacher that differs from the policy
    ck = Checkpointer(os.path.join(root, "ref"), keep_last=0)
    state = {"scheduler": policy.scheduler.state_dict(), "sampler": {"cursor": 12}}
    ck.save(3, policy.model, policy.optimizer, state, teacher=teacher, layout=_layout(policy))
    if dist_opt:
        _save_old_format(policy, os.path.join(root, "old"))

    def step_and_save(name: str) -> None:
        # step 4 (its loss depends on the loaded weights only), the state after it (weights and
        # Adam moments: what the optimizer did with the resharded state), step 5's loss
        loss4 = _step(policy, 4)
        Checkpointer(os.path.join(root, name + "_next"), keep_last=0).save(
            4, policy.model, policy.optimizer, {}, teacher=teacher, layout=_layout(policy)
        )
        out["loss"][name] = [loss4, _step(policy, 5)]
        out["lr"][name] = policy.optimizer.param_groups[0]["lr"]

    step_and_save("ref")  # uninterrupted, at the original layout
    for tp, pp in ((2, 1), (1, 2)):
        name = f"tp{tp}pp{pp}"
        policy = _policy(tp, pp, dist_opt)
        teacher = policy.make_teacher_copy()
        loaded = ck.load(os.path.join(root, "ref", IT), policy.model, policy.optimizer,
                         teacher=teacher, layout=_layout(policy))  # fmt: skip
        policy.scheduler.load_state_dict(loaded["scheduler"])
        assert loaded["sampler"] == {"cursor": 12}
        # what was loaded, written again at this layout: compared as full tensors by the test
        Checkpointer(os.path.join(root, name), keep_last=0).save(
            3, policy.model, policy.optimizer, {}, teacher=teacher, layout=_layout(policy)
        )
        step_and_save(name)
        if dist_opt and tp == 2:  # the old format at another TP: refused before megatron fails
            try:
                ck.load(os.path.join(root, "old", IT), policy.model, policy.optimizer,
                        layout=_layout(policy))  # fmt: skip
                out["old_refused"] = None
            except ResumeError as e:
                out["old_refused"] = str(e)
    try:  # same layout, another global batch: refused
        ck.load(ck.latest(), policy.model, policy.optimizer,
                layout={**_layout(policy), "global_batch": 2 * ROWS})  # fmt: skip
        out["refused"] = None
    except ResumeError as e:
        out["refused"] = str(e)
    return out


def flat_tensors(d: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """`{"a/b/c": tensor}` of a nested (loaded) state dict's tensors."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_tensors(v, f"{prefix}{k}/"))
        elif isinstance(v, torch.Tensor):  # the common (non-sharded) state is not resharded
            out[prefix + k] = v
    return out


def _compare(rank: int, world: int, root: str, dist_opt: bool) -> dict:
    """Full-tensor comparison of the re-saved checkpoints with the saved one (one process)."""
    import json

    from megatron.core import dist_checkpointing

    from rlrt_megatron import platform
    from rlrt_megatron.trainer.checkpoint import Checkpointer

    platform.init_distributed(1, 1)
    flat = flat_tensors

    def plain(name: str, it: str = IT) -> dict[str, torch.Tensor]:
        return flat(dist_checkpointing.load_plain_tensors(os.path.join(root, name, it, "dist")))

    def adam_step(name: str, it: str = IT) -> float:
        with open(os.path.join(root, name, it, "trainer_state.json")) as f:
            return json.load(f)["optimizer_adam_step"]

    def differ(a: dict, b: dict) -> list[str]:
        return sorted(
            k for k in set(a) | set(b) if k not in a or k not in b or not torch.equal(a[k], b[k])
        )

    ref, ref_next = plain("ref"), plain("ref_next", IT_NEXT)
    out = {"keys": sorted(ref), "step": {"ref": adam_step("ref")}, "differ": {}, "after_step": {}}
    out["step_next"] = {"ref": adam_step("ref_next", IT_NEXT)}
    for name in ("tp2pp1", "tp1pp2"):
        out["differ"][name] = differ(ref, plain(name))
        out["step"][name] = adam_step(name)
        # after one step on the resharded layout: the largest difference relative to the
        # tensor's scale, per kind of tensor (weights, first and second Adam moments)
        again = plain(name + "_next", IT_NEXT)
        assert sorted(again) == sorted(ref_next), name
        worst: dict[str, float] = {}
        for k, t in ref_next.items():
            kind = next((m for m in ("exp_avg_sq", "exp_avg", "param") if f".{m}." in k), "weight")
            rel = float((again[k] - t).abs().max() / t.abs().max().clamp_min(1e-30))
            worst[kind] = max(worst.get(kind, 0.0), rel)
        out["after_step"][name] = worst
        out["step_next"][name] = adam_step(name + "_next", IT_NEXT)
    if dist_opt:  # the old format at DP 1 (saved at DP 2): loads, and re-saved equals `ref`
        policy = _policy(1, 1, True)
        ck = Checkpointer(os.path.join(root, "old"), keep_last=0)
        ck.load(ck.latest(), policy.model, policy.optimizer, layout=_layout(policy))
        Checkpointer(os.path.join(root, "old_dp1"), keep_last=0).save(
            3, policy.model, policy.optimizer, {}, layout=_layout(policy)
        )
        old = plain("old_dp1")
        out["old_dp1_differ"] = differ({k: v for k, v in ref.items() if "teacher" not in k}, old)
    return out


IT, IT_NEXT = "iter_0000003", "iter_0000004"
# float-summation noise of one step at another TP / PP (TP's split reductions), relative to each
# tensor's largest entry; a wrong Adam state is off by orders of magnitude more
STEP_RTOL = 1e-5


@pytest.mark.parametrize("dist_opt", [False, True], ids=["optimizer", "distributed_optimizer"])
def test_resume_at_another_layout(tmp_path, dist_opt):
    res = run_distributed(_worker, 2, str(tmp_path), dist_opt, timeout=900)[0]
    (cmp,) = run_distributed(_compare, 1, str(tmp_path), dist_opt)
    keys = cmp["keys"]
    for part in (".exp_avg.", ".exp_avg_sq.", "teacher.", "decoder.layers"):
        assert any(part in k for k in keys), (part, keys[:20])
    assert cmp["differ"] == {"tp2pp1": [], "tp1pp2": []}
    assert cmp["step"] == {"ref": 3.0, "tp2pp1": 3.0, "tp1pp2": 3.0}
    for name in ("tp2pp1", "tp1pp2"):
        worst = cmp["after_step"][name]
        assert set(worst) >= {"weight", "exp_avg", "exp_avg_sq"}, worst
        assert max(worst.values()) < STEP_RTOL, (name, worst)
        for i in (0, 1):  # the loss of the step after the load, and of the one after that
            rel = abs(res["loss"][name][i] - res["loss"]["ref"][i]) / abs(res["loss"]["ref"][i])
            assert rel < 1e-5, (name, i, res["loss"])
        assert res["lr"][name] == res["lr"]["ref"]
    assert cmp["step_next"] == {"ref": 4.0, "tp2pp1": 4.0, "tp1pp2": 4.0}
    assert "global batch" in res["refused"] and "8" in res["refused"]
    if dist_opt:
        msg = res["old_refused"]
        assert msg is not None and "dp_reshardable" in msg, msg
        assert "tp 1 x pp 1 x dp 2" in msg and "tp 2 x pp 1 x dp 1" in msg, msg
        assert "parallel.tp=1" in msg and "fully_reshardable" in msg, msg
        assert cmp["old_dp1_differ"] == []


def test_adam_step_kept_apart_for_fused_adam():
    """TE / Apex FusedAdam keep one `step` per param group and none per parameter: the step
    saved in the trainer state comes back there (torch Adam's per-parameter steps above)."""
    from rlrt_megatron.trainer.optimizer_state import adam_step, set_adam_step

    class FusedLike:  # megatron's wrapper around an inner optimizer with group-level steps
        def __init__(self) -> None:
            p = torch.nn.Parameter(torch.zeros(3))
            self.optimizer = torch.optim.SGD([p], lr=0.1)
            self.optimizer.param_groups[0]["step"] = 7
            self.optimizer.state[p] = {"exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}

    opt = FusedLike()
    assert adam_step(opt) == 7.0
    set_adam_step(opt, 3.0)
    assert opt.optimizer.param_groups[0]["step"] == 3 and adam_step(opt) == 3.0
    assert all("step" not in st for st in opt.optimizer.state.values())
