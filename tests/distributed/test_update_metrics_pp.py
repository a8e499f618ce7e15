"""The update's logged metrics are the same at PP=2 as at PP=1 (issue 24, item 6).

Two gloo processes run `Policy.train_minibatch` with GRPO's real loss (TIS on) on the same
weights and rollouts, first at TP=1/PP=1 (DP=2, both ranks on the same rows, so DDP's average is
the single-rank update), then at PP=2 (the weights re-sharded into two stages). The mini-batch is
split into 3 micro-batches. The loss and every algorithm metric (means over micro-batches) must
agree on both ranks, in particular on rank 0, the rank that logs, which at PP=2 is the first
stage: it has no micro-batch outputs of its own (before the fix it logged the last stage's sums,
3x the means, divided by its own count of micro-batches, 0 -> 1).
"""

from __future__ import annotations

import pytest
import update_batch
from dist_utils import run_distributed

pytestmark = pytest.mark.distributed


def _layout(pp: int, full: dict | None) -> tuple[dict, dict]:
    from rlrt_megatron import platform
    from rlrt_megatron.config import OptimizerConfig
    from rlrt_megatron.convert.tiny import tiny_config
    from rlrt_megatron.megatron.parallel import gather_full_params, shard_state_dict_for_tp
    from rlrt_megatron.megatron.train_step import Policy

    platform.init_distributed(tp=1, pp=pp, seed=1234)
    policy = Policy(
        tiny_config(vocab_size=update_batch.VOCAB, num_layers=2), tp=1, pp=pp,
        optim=OptimizerConfig(lr=1e-3), total_steps=4,
    )  # fmt: skip
    if full is not None:
        for c in policy.chunks:
            c.load_state_dict(shard_state_dict_for_tp(full, c), strict=True)
        policy.sync_main_params()
    params = gather_full_params(policy.chunks)
    out = update_batch.train(policy, "grpo")
    return params, out


def _worker(rank: int, world: int) -> dict:
    params, ref = _layout(1, None)
    _, pp2 = _layout(2, params)
    return {"pp1": ref, "pp2": pp2}


def test_pp2_logs_the_same_update_metrics_as_pp1():
    for rank, res in enumerate(run_distributed(_worker, 2, timeout=300)):
        ref, got = res["pp1"], res["pp2"]
        assert set(got) == set(ref), rank
        assert ref["clipfrac"] > 0 and ref["ratio_mean"] > 0  # the metrics are not all zero
        for k in sorted(ref):
            assert got[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-6), (rank, k, got[k], ref[k])
