"""rollout_correction: hand-computed reference numerics for every mode and level, masks, empty
rows, cap edges; weights detached; threaded through every algorithm's loss; mode "none" leaves
every loss bit-identical to no correction."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

from rlrt_megatron.algorithms import (
    ALGORITHMS,
    AlgorithmConfig,
    RolloutCorrectionConfig,
    get_algorithm,
    policy_loss,
    rollout_correction,
)
from rlrt_megatron.algorithms.losses import ppo_token_losses
from rlrt_megatron.config import ConfigError, TrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from test_registry import B, T, make_batch, make_topk  # noqa: E402

# old - rollout per token: row 0 = [0, 1, -1], row 1 = [0.5, masked, masked], row 2 empty
OLD = torch.tensor([[0.0, -1.0, -2.0], [-0.5, 7.0, float("nan")], [3.0, 3.0, 3.0]])
ROLL = torch.tensor([[0.0, -2.0, -1.0], [-1.0, -9.0, float("inf")], [-3.0, 0.0, 1.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
E = math.e


def _k3(ds: list[float]) -> float:  # d = rollout - old
    return sum(math.exp(d) - d - 1 for d in ds) / len(ds)


K3 = _k3([0.0, -1.0, 1.0, -0.5])


def _close(a: torch.Tensor, rows: list[list[float]]) -> None:
    torch.testing.assert_close(a, torch.tensor(rows, dtype=torch.float32), rtol=1e-6, atol=1e-7)


def test_tis_token_reference() -> None:
    w, m = rollout_correction(OLD, ROLL, MASK, mode="tis", cap=2.0)
    _close(w, [[1.0, 2.0, 1 / E], [math.exp(0.5), 0, 0], [0, 0, 0]])  # e > cap -> cap
    assert m["mismatch/k3"] == pytest.approx(K3, rel=1e-6)
    assert m["mismatch/max_abs"] == pytest.approx(1.0)
    assert m["mismatch/clip_frac"] == pytest.approx(1 / 4)
    assert set(m) == {"mismatch/k3", "mismatch/max_abs", "mismatch/clip_frac"}
    assert all(isinstance(v, float) for v in m.values())


def test_mis_token_reference_and_low() -> None:
    w, m = rollout_correction(OLD, ROLL, MASK, mode="mis", cap=2.0)  # keep [0.5, 2]
    _close(w, [[1, 0, 0], [1, 0, 0], [0, 0, 0]])
    assert m["mismatch/clip_frac"] == pytest.approx(2 / 4)
    w, m = rollout_correction(OLD, ROLL, MASK, mode="mis", cap=3.0, low=0.3)  # keep [0.3, 3]
    _close(w, [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert m["mismatch/clip_frac"] == 0.0
    assert m["mismatch/k3"] == pytest.approx(K3, rel=1e-6)  # metrics do not depend on the mode


def test_geometric_level_reference() -> None:
    # row 0: mean log-ratio (0 + 1 - 1) / 3 = 0 -> ratio 1; row 1: 0.5 -> e^0.5; row 2 empty
    w, m = rollout_correction(OLD, ROLL, MASK, mode="tis", cap=2.0, level="geometric")
    _close(w, [[1, 1, 1], [math.exp(0.5), 0, 0], [0, 0, 0]])
    assert m["mismatch/clip_frac"] == 0.0
    w, m = rollout_correction(OLD, ROLL, MASK, mode="tis", cap=1.5, level="geometric")
    _close(w, [[1, 1, 1], [1.5, 0, 0], [0, 0, 0]])
    assert m["mismatch/clip_frac"] == pytest.approx(1 / 4)  # the token of row 1
    w, m = rollout_correction(OLD, ROLL, MASK, mode="mis", cap=1.5, level="geometric")
    _close(w, [[1, 1, 1], [0, 0, 0], [0, 0, 0]])
    assert m["mismatch/k3"] == pytest.approx(K3, rel=1e-6)


# old - rollout: row 0 sums to 0.7 over 3 tokens, row 1 to -1 over 2, row 2 to 60 (> 20) over 2
SEQ_OLD = torch.tensor([[0.3, 0.4, 0.0], [-0.5, -0.5, 9.0], [30.0, 30.0, 0.0]])
SEQ_MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0]])


def test_sequence_level_is_the_product_of_the_token_ratios() -> None:
    """verl's sequence level: exp(clamp(sum_t log r, -20, 20)), then truncated at cap (tis) or
    kept in [low, cap] (mis); the geometric mean (`geometric`) differs on the same rows."""
    roll = torch.zeros(3, 3)
    p0, p1 = math.exp(0.7), math.exp(-1.0)  # products; row 2: e^60 -> e^20 -> the cap
    w, m = rollout_correction(SEQ_OLD, roll, SEQ_MASK, mode="tis", cap=3.0, level="sequence")
    _close(w, [[p0, p0, p0], [p1, p1, 0], [3.0, 3.0, 0]])
    assert m["mismatch/clip_frac"] == pytest.approx(2 / 7)  # row 2's two tokens
    w, m = rollout_correction(SEQ_OLD, roll, SEQ_MASK, mode="tis", cap=2.0, level="sequence")
    _close(w, [[2.0, 2.0, 2.0], [p1, p1, 0], [2.0, 2.0, 0]])  # e^0.7 = 2.01 > 2
    assert m["mismatch/clip_frac"] == pytest.approx(5 / 7)
    w, _ = rollout_correction(SEQ_OLD, roll, SEQ_MASK, mode="mis", cap=2.0, level="sequence")
    _close(w, [[0, 0, 0], [0, 0, 0], [0, 0, 0]])  # 2.01 > 2, e^-1 < 1/2, e^20 > 2
    w, _ = rollout_correction(SEQ_OLD, roll, SEQ_MASK, mode="mis", cap=2.5, level="sequence")
    _close(w, [[1, 1, 1], [0, 0, 0], [0, 0, 0]])
    g0, g1 = math.exp(0.7 / 3), math.exp(-0.5)
    w, _ = rollout_correction(SEQ_OLD, roll, SEQ_MASK, mode="tis", cap=3.0, level="geometric")
    _close(w, [[g0, g0, g0], [g1, g1, 0], [3.0, 3.0, 0]])


@pytest.mark.parametrize("level", ["sequence", "geometric"])
def test_row_levels_every_token_of_a_row_shares_its_ratio(level: str) -> None:
    g = torch.Generator().manual_seed(0)
    old, roll = -torch.rand(4, 6, generator=g), -torch.rand(4, 6, generator=g)
    mask = torch.ones(4, 6)
    mask[1, 3:] = 0
    w, _ = rollout_correction(old, roll, mask, mode="tis", cap=10.0, level=level)
    for i in range(4):
        n = int(mask[i].sum())
        ref = math.exp(float((old[i, :n] - roll[i, :n]).sum()) / (n if level == "geometric" else 1))
        torch.testing.assert_close(w[i, :n], torch.full((n,), ref), rtol=1e-5, atol=0)
        assert (w[i, n:] == 0).all()


def test_none_mode_and_identical_sides() -> None:
    w, m = rollout_correction(OLD, ROLL, MASK, mode="none")
    _close(w, [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert m["mismatch/clip_frac"] == 0.0 and m["mismatch/k3"] > 0
    for mode in ("tis", "mis"):
        w, m = rollout_correction(OLD, OLD, MASK, mode=mode)
        assert torch.equal(w, MASK.float())  # ratio exactly 1
        assert m == {"mismatch/k3": 0.0, "mismatch/max_abs": 0.0, "mismatch/clip_frac": 0.0}


def test_cap_edges() -> None:
    old = torch.tensor([[math.log(2.0), 30.0, -30.0]])
    roll = torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    # a ratio exactly at the cap is kept (not counted as clipped); a huge one stays finite
    w, m = rollout_correction(old, roll, mask, mode="tis", cap=float(torch.tensor(2.0).exp().log()))
    assert torch.isfinite(w).all()
    w, m = rollout_correction(old, roll, mask, mode="tis", cap=2.0)
    assert float(w[0, 0]) == pytest.approx(2.0) and float(w[0, 1]) == 2.0
    assert float(w[0, 2]) == pytest.approx(math.exp(-30.0), rel=1e-5)
    assert m["mismatch/clip_frac"] == pytest.approx(1 / 3)  # exp(log 2) rounds to <= 2
    w, m = rollout_correction(old, roll, mask, mode="tis", cap=float("inf"))
    assert torch.isfinite(w).all() and m["mismatch/clip_frac"] == 0.0
    w, _ = rollout_correction(old, roll, mask, mode="mis", cap=2.0, low=0.0)
    _close(w, [[1, 0, 1]])
    w, _ = rollout_correction(old, roll, mask, mode="mis", cap=1.0, low=1.0)  # only ratio == 1
    _close(w, [[0, 0, 0]])
    w, _ = rollout_correction(roll, roll, mask, mode="mis", cap=1.0, low=1.0)
    _close(w, [[1, 1, 1]])


def test_empty_mask_and_bf16_inputs() -> None:
    w, m = rollout_correction(OLD, ROLL, torch.zeros(3, 3), mode="tis")
    assert (w == 0).all() and m == {
        "mismatch/k3": 0.0, "mismatch/max_abs": 0.0, "mismatch/clip_frac": 0.0,
    }  # fmt: skip
    w, m = rollout_correction(OLD.bfloat16(), ROLL.bfloat16(), MASK.bool(), mode="tis")
    assert w.dtype == torch.float32
    _close(w, [[1.0, 2.0, 1 / E], [math.exp(0.5), 0, 0], [0, 0, 0]])


def test_weights_are_detached() -> None:
    old = OLD.clone().nan_to_num(0.0).requires_grad_()
    roll = ROLL.clone().nan_to_num(0.0, posinf=0.0).requires_grad_()
    for mode in ("none", "tis", "mis"):
        for level in ("token", "sequence", "geometric"):
            w, _ = rollout_correction(old, roll, MASK, mode=mode, level=level)
            assert not w.requires_grad and w.grad_fn is None


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        rollout_correction(OLD, ROLL, MASK, mode="is")
    with pytest.raises(ValueError, match="level.*geometric"):
        rollout_correction(OLD, ROLL, MASK, level="row")
    with pytest.raises(ValueError, match="cap"):
        rollout_correction(OLD, ROLL, MASK, cap=0.0)
    with pytest.raises(ValueError, match="low"):
        rollout_correction(OLD, ROLL, MASK, mode="tis", low=0.5)
    with pytest.raises(ValueError, match="low <= cap"):
        rollout_correction(OLD, ROLL, MASK, mode="mis", cap=2.0, low=3.0)
    with pytest.raises(ValueError, match="shape"):
        rollout_correction(OLD, ROLL[:, :2], MASK)
    with pytest.raises(ValueError, match="NaN/inf"):
        rollout_correction(OLD, ROLL, torch.ones(3, 3))


def test_config_keys_and_validation() -> None:
    cfg = TrainConfig()
    assert cfg.algorithm.rollout_correction == RolloutCorrectionConfig()
    assert cfg.algorithm.rollout_correction.mode == "none"
    cfg.override(
        ["algorithm.rollout_correction.mode=mis", "algorithm.rollout_correction.low=0.25",
         "algorithm.rollout_correction.level=sequence", "model.build_tiny=true"]
    )  # fmt: skip
    cfg.validate()
    algo = get_algorithm(cfg.algorithm.name, cfg.algorithm)
    assert algo.correction == RolloutCorrectionConfig(mode="mis", low=0.25, level="sequence")
    cfg.override(["algorithm.rollout_correction.mode=tis"])
    with pytest.raises(ConfigError, match="algorithm.rollout_correction"):
        cfg.validate()
    with pytest.raises(ConfigError, match="must be one of"):
        TrainConfig().override(["algorithm.rollout_correction.mode=icepop"])
    back = TrainConfig.from_dict(TrainConfig().to_dict())
    assert back.algorithm.rollout_correction == RolloutCorrectionConfig()


def test_correction_with_the_engines_old_logprobs_is_refused() -> None:
    """recompute_old_logprobs=false makes old = the engine's log-probs: the PPO ratio then spans
    the mismatch, and tis / mis would count it a second time."""
    from recipes import get_recipe

    for mode in ("tis", "mis"):
        with pytest.raises(ConfigError) as err:
            get_recipe(
                "tiny_demo",
                [f"algorithm.rollout_correction.mode={mode}", "train.recompute_old_logprobs=false"],
            )
        msg = str(err.value)
        assert "algorithm.rollout_correction.mode" in msg
        assert "train.recompute_old_logprobs=false" in msg and "twice" in msg
    # either alone is fine
    get_recipe("tiny_demo", ["train.recompute_old_logprobs=false"])
    get_recipe("tiny_demo", ["algorithm.rollout_correction.mode=tis"])


def test_recipes_default_tis_on_gpu_none_on_the_demo() -> None:
    from recipes import get_recipe, list_recipes

    for name in list_recipes():
        c = get_recipe(name).algorithm.rollout_correction
        want = "none" if name.startswith("tiny_demo") else "tis"
        assert (c.mode, c.cap) == (want, 2.0), name
        assert get_recipe(name).train.recompute_old_logprobs, name  # the correction needs it


# ---- through the registry -------------------------------------------------------------------


def _with_rollout(batch, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    roll = batch.student_logprobs.float() - 0.4 * torch.rand(B, T, generator=g) + 0.2
    return dataclasses.replace(batch, rollout_logprobs=roll.to(batch.student_logprobs.dtype))


def _loss_and_grads(algo, batch, seed: int = 3):
    prepared = algo.prepare(batch)
    g = torch.Generator().manual_seed(seed)
    lp = (batch.old_logprobs.float() + 0.2 * torch.randn(B, T, generator=g)).requires_grad_()
    topk = make_topk(B) if algo.needs_topk else None
    loss, metrics = algo.loss(lp, prepared, topk=topk)
    loss.backward()
    grads = [lp.grad] + ([topk.student_topk_logprobs.grad] if topk else [])
    return prepared, loss, grads, metrics


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mode_none_is_bit_identical_for_every_algorithm(name: str, dtype: torch.dtype) -> None:
    base = make_batch(dtype=dtype)
    base = dataclasses.replace(base, teacher_entropy=make_topk(B).teacher_entropy)
    _, ref_loss, ref_grads, ref_m = _loss_and_grads(get_algorithm(name), base)
    cfg = AlgorithmConfig(name=name)  # rollout_correction defaults to mode "none"
    prepared, loss, grads, m = _loss_and_grads(get_algorithm(None, cfg), _with_rollout(base))
    assert prepared.correction_weights is None
    assert torch.equal(loss, ref_loss), name
    for a, b in zip(grads, ref_grads, strict=True):
        assert (a is None and b is None) or torch.equal(a, b), name
    assert m == ref_m
    assert prepared.metrics["mismatch/k3"] > 0  # mode none still measures the mismatch


def test_mode_none_equals_the_plain_policy_loss() -> None:
    batch = _with_rollout(make_batch())
    algo = get_algorithm("dapo", correction=RolloutCorrectionConfig(mode="none"))
    prepared = algo.prepare(batch)
    lp = batch.old_logprobs + 0.3
    loss, _ = algo.loss(lp, prepared)
    ref, _ = policy_loss(lp, batch.old_logprobs, prepared.advantages, batch.mask)
    assert torch.equal(loss, ref)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_tis_weights_reach_every_algorithms_loss(name: str) -> None:
    batch = _with_rollout(dataclasses.replace(make_batch(), teacher_entropy=make_topk(B)[2]))
    plain = get_algorithm(name)
    tis = get_algorithm(name, correction=RolloutCorrectionConfig(mode="tis", cap=1.1))
    pp, lp0, _, _ = _loss_and_grads(plain, batch)
    pt, lt, grads, _ = _loss_and_grads(tis, batch)
    w, m = rollout_correction(
        batch.student_logprobs, batch.rollout_logprobs, batch.mask, "tis", 1.1
    )
    assert torch.equal(pt.correction_weights, w)
    assert pt.metrics["mismatch/k3"] == m["mismatch/k3"] > 0
    assert pt.metrics["mismatch/clip_frac"] > 0
    assert not torch.equal(lt, lp0)
    assert all(torch.isfinite(gr).all() for gr in grads if gr is not None)
    # weights of exactly 1 give the uncorrected loss back
    ones = dataclasses.replace(pt, correction_weights=pt.mask.float())
    g = torch.Generator().manual_seed(3)
    lp = batch.old_logprobs.float() + 0.2 * torch.randn(B, T, generator=g)
    topk = make_topk(B) if plain.needs_topk else None
    assert torch.equal(tis.loss(lp, ones, topk=topk)[0], plain.loss(lp, pp, topk=topk)[0])


def test_tis_multiplies_each_ppo_token_term() -> None:
    batch = _with_rollout(make_batch())
    algo = get_algorithm("dapo", correction=RolloutCorrectionConfig(mode="tis", cap=1.1))
    prepared = algo.prepare(batch)
    lp = (batch.old_logprobs + 0.1).requires_grad_()
    loss, _ = algo.loss(lp, prepared)
    tok, _ = ppo_token_losses(lp, batch.old_logprobs, prepared.advantages, batch.mask, 0.2, 0.28)
    ref = (tok * prepared.correction_weights).sum() / batch.mask.sum()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    loss.backward()
    assert lp.grad is not None and prepared.correction_weights.grad_fn is None
    # masked tokens of the (sliced) micro-batch keep weight 0
    assert (prepared.select([1]).correction_weights[0, 4:] == 0).all()


def test_mis_drops_tokens_from_the_loss() -> None:
    batch = _with_rollout(make_batch())
    algo = get_algorithm("grpo", correction=RolloutCorrectionConfig(mode="mis", cap=1.05))
    prepared = algo.prepare(batch)
    dropped = batch.mask.bool() & (prepared.correction_weights == 0)
    assert dropped.any()
    lp = (batch.old_logprobs + 0.1).requires_grad_()
    algo.loss(lp, prepared)[0].backward()
    assert (lp.grad[dropped] == 0).all()
    assert (lp.grad[batch.mask.bool() & ~dropped] != 0).any()


def test_no_rollout_logprobs_means_no_correction() -> None:
    algo = get_algorithm("grpo", correction={"mode": "tis"})
    prepared = algo.prepare(make_batch())
    assert prepared.correction_weights is None
    assert not any(k.startswith("mismatch/") for k in prepared.metrics)
