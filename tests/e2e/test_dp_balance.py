"""DP balancing by tokens (`train.balance_dp`): two data-parallel ranks (real gloo, fp32, CPU)
take one optimizer step on the same rollouts, once with the mini-batch split by tokens and once
by position. The loss normalisers are the whole mini-batch's and DDP sums the ranks' gradients, so
the parameters after the step agree up to summation order."""

from __future__ import annotations

import pytest
from dist_utils import run_distributed
from e2e_helpers import FAST, model_overrides

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]
# rows of unequal length whatever the demo model answers (its SFT-warmed answers to the
# fixture prompts all have one length), and long enough that some groups are right and some
# wrong, so that the step moves the parameters
EXTRA = ["rollout.local_length_tail=true", "rollout.max_new_tokens=96"]


def _one_update(rank: int, world: int, model: dict, run_dir: str, balance: bool) -> tuple:
    from recipes import get_recipe
    from rlrt_megatron.trainer import steps
    from rlrt_megatron.trainer.train import train

    cfg = get_recipe(
        "tiny_demo",
        [*FAST, *model_overrides(model), "train.steps=1", "train.mini_batch_prompts=4",
         *EXTRA,
         f"train.balance_dp={balance}", f"logging.run_dir={run_dir}"],
    )  # fmt: skip
    before: dict = {}
    after: dict = {}
    sync, take = steps.sync, steps.rollout

    def params(run) -> dict:
        return {
            f"{c}.{n}": p.detach().clone()
            for c, chunk in enumerate(run.policy.chunks)
            for n, p in chunk.named_parameters()
        }

    def rollout(run, step):  # the weights before the update
        before.update(params(run))
        return take(run, step)

    def sync_after(run, step):  # the sync phase follows the update
        after.update(params(run))
        return sync(run, step)

    steps.rollout, steps.sync = rollout, sync_after
    return train(cfg)["metrics"], before, after


def test_balanced_update_equals_unbalanced(tiny_model, tmp_path):
    import torch

    plain, p0, p_plain = run_distributed(
        _one_update, 2, tiny_model, str(tmp_path / "plain"), False
    )[0]
    bal, _, p_bal = run_distributed(_one_update, 2, tiny_model, str(tmp_path / "bal"), True)[0]
    a, b = plain[0], bal[0]
    counts = {
        name: [m[f"train/dp_tokens_rank{r}"] for r in (0, 1)] for name, m in (("by position", a),
                                                                               ("by tokens", b))
    }  # fmt: skip
    print("per-rank tokens:", counts, "max/mean:", a["train/dp_tokens_max_over_mean"],
          b["train/dp_tokens_max_over_mean"])  # fmt: skip
    assert a["reward/mean"] == b["reward/mean"]  # the same rollouts
    assert sum(counts["by position"]) == sum(counts["by tokens"])
    assert counts["by position"] != counts["by tokens"], "the split should move rows"
    assert b["train/dp_tokens_max_over_mean"] <= a["train/dp_tokens_max_over_mean"]
    assert b["loss/value"] == pytest.approx(a["loss/value"], rel=1e-6)
    moved = 0.0
    for name, w in p_plain.items():
        rel = float((p_bal[name] - w).norm() / w.norm().clamp(min=1e-30))
        assert rel <= 1e-6, f"{name}: balanced and unbalanced updates differ by {rel:.2e}"
        moved = max(moved, float((w - p0[name]).norm() / p0[name].norm().clamp(min=1e-30)))
    assert moved > 1e-4, "the optimizer step should move the parameters"
    assert torch.isfinite(torch.tensor(b["train/grad_norm"]))
