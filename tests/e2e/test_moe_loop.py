"""The tiny RLRT loop with the tiny random Qwen3-MoE (8 experts, top-2) on CPU: built, converted
and trained for two steps at EP=1, then the same first step at EP=2 (two gloo processes, the
experts split over them) and at EP=2 x TP=2 with sequence parallelism (four) gives the same
loss and gradient norm, and the router metrics are logged."""

from __future__ import annotations

import math

import pytest
from dist_utils import run_distributed
from e2e_helpers import FAST

# slow tier (`make test-slow`, run by .ci/run when time allows): keeps `make test` < 15 min
pytestmark = [pytest.mark.e2e, pytest.mark.distributed, pytest.mark.slow]

# SFT-warmed as the dense demo model, so some rollouts are correct and the loss has a gradient
MOE = ["model.tiny_arch=qwen3_moe", "model.sft_warmup_steps=300", "rollout.max_new_tokens=16"]


def _train(
    rank: int, world: int, run_dir: str, model_dir: str, steps: int, ep: int, tp: int = 1
) -> list:
    from recipes import get_recipe
    from rlrt_megatron.trainer.train import train

    cfg = get_recipe(
        "tiny_demo",
        [*FAST, *MOE, f"train.steps={steps}", f"logging.run_dir={run_dir}",
         f"parallel.ep={ep}", f"model.hf_path={model_dir}/hf" if ep > 1 else "model.hf_path=",
         f"model.megatron_ckpt={model_dir}/megatron" if ep > 1 else "model.megatron_ckpt=",
         f"parallel.tp={tp}", f"parallel.sequence_parallel={str(tp > 1).lower()}"],
    )  # fmt: skip
    return train(cfg)["metrics"]


def test_tiny_moe_trains_and_ep2_matches_ep1(tmp_path):
    ep1_dir = tmp_path / "ep1"
    (rows,) = run_distributed(_train, 1, str(ep1_dir), "", 2, 1)
    assert len(rows) == 2
    for row in rows:
        assert math.isfinite(row["loss/value"])
        assert row["moe/aux_loss"] == 0.0  # off by default
        loads = [v for k, v in row.items() if k.startswith("moe/load_max_over_mean/layer_")]
        assert len(loads) == 2 and all(1.0 <= v <= 4.0 for v in loads)  # E / k = 4 at worst
    ep2 = run_distributed(_train, 2, str(tmp_path / "ep2"), str(ep1_dir / "model"), 1, 2)[0]
    a, b = rows[0], ep2[0]
    assert a["reward/mean"] == b["reward/mean"]  # same rollouts
    assert b["loss/value"] == pytest.approx(a["loss/value"], rel=1e-5, abs=1e-7)
    assert a["train/grad_norm"] > 0
    assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)
    # EP=2 x TP=2 with sequence parallelism (four processes): the same first step
    tp2 = run_distributed(_train, 4, str(tmp_path / "tp2"), str(ep1_dir / "model"), 1, 2, 2)[0]
    c = tp2[0]
    assert c["reward/mean"] == a["reward/mean"]
    assert c["loss/value"] == pytest.approx(a["loss/value"], rel=1e-5, abs=1e-7)
    assert c["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)
