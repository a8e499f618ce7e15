"""Case 7 at the optimizer: a mini-batch whose loss or gradient is not finite takes no optimizer
step (the weights stay exactly as they were, finite) and `Policy.last_nonfinite` names the
tensor; the next finite mini-batch steps as usual."""

from __future__ import annotations

import math

import pytest
from dist_utils import single_process_megatron

pytestmark = pytest.mark.faults


@pytest.mark.parametrize("kind, named", [("nan_grad", "gradient of "), ("inf_loss", "loss")])
def test_nonfinite_minibatch_takes_no_step(kind, named):
    from rlrt_megatron.config import OptimizerConfig
    from rlrt_megatron.convert.tiny import tiny_config
    from rlrt_megatron.megatron.train_step import Policy
    from rlrt_megatron.trainer.faults import spoil_loss

    seqs, starts = [list(range(3, 15)), list(range(20, 30))], [5, 3]

    def step(policy, spoil: bool) -> dict:
        def loss_of(lp, rows, tk):
            loss = -lp.sum() / 14
            return (spoil_loss(loss, kind) if spoil else loss), {}

        return policy.train_minibatch(seqs, starts, [0, 1], 7, 64, loss_of)

    with single_process_megatron():
        policy = Policy(tiny_config(vocab_size=256), tp=1, pp=1, optim=OptimizerConfig(lr=1e-2),
                        total_steps=10)  # fmt: skip
        before = {n: p.detach().clone() for n, p in policy.chunks[0].named_parameters()}
        out = step(policy, spoil=True)
        assert out["nonfinite_skipped"] == 1.0 and out["update_ok"] == 0.0
        assert policy.last_nonfinite is not None and policy.last_nonfinite.startswith(named)
        after = dict(policy.chunks[0].named_parameters())
        assert all(before[n].equal(p) for n, p in after.items())  # no step at all
        out = step(policy, spoil=False)
        assert out["nonfinite_skipped"] == 0.0 and policy.last_nonfinite is None
        assert math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"])
        assert any(not before[n].equal(p) for n, p in after.items())  # this one stepped
        assert all(p.isfinite().all() for p in after.values())
