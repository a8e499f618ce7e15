"""Data parallelism: two DP ranks (distributed optimizer) give the single-rank step's loss and
gradient norm: the mini-batch normalisers are global and DDP averages the gradients."""

from __future__ import annotations

import pytest
from dist_utils import run_distributed
from e2e_helpers import FAST, model_overrides

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]


def _one_step(rank: int, world: int, model: dict, run_dir: str) -> list[dict]:
    from recipes import get_recipe
    from rlrt_megatron.trainer.train import train

    cfg = get_recipe(
        "tiny_demo",
        [*FAST, *model_overrides(model), "train.steps=1", f"logging.run_dir={run_dir}"],
    )
    return train(cfg)["metrics"]


def test_dp2_matches_dp1(tiny_model, tmp_path):
    (dp1,) = run_distributed(_one_step, 1, tiny_model, str(tmp_path / "dp1"))
    dp2 = run_distributed(_one_step, 2, tiny_model, str(tmp_path / "dp2"))[0]
    a, b = dp1[0], dp2[0]
    assert a["reward/mean"] == b["reward/mean"]  # same rollouts (engine on rank 0, same seed)
    assert b["loss/value"] == pytest.approx(a["loss/value"], rel=1e-5, abs=1e-7)
    assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)
    assert a["train/grad_norm"] > 0
