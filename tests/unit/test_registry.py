"""The ALGORITHMS registry: every algorithm on one batch, rlrt(alpha=0) == grpo exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rlrt_megatron.algorithms import (
    ALGORITHMS,
    AlgoBatch,
    AlgorithmConfig,
    RLRTConfig,
    TopK,
    append_tail_bucket,
    get_algorithm,
    group_advantages,
    policy_loss,
)

B, T, G, K = 8, 7, 4, 5


def make_batch(seed: int = 0, dtype: torch.dtype = torch.float32) -> AlgoBatch:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[5, 2:] = 0
    mask[6, 6:] = 0
    rewards = torch.tensor([1.0, 0, 1, 0, 1, 1, 1, 0])
    old = -torch.rand(B, T, generator=g) * 2
    student = old + 0.01 * torch.randn(B, T, generator=g)
    teacher = -torch.rand(B, T, generator=g) * 2
    has_teacher = torch.tensor([1, 1, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    return AlgoBatch(
        rewards=rewards,
        group_size=G,
        mask=mask,
        old_logprobs=old.to(dtype),
        student_logprobs=student.to(dtype),
        teacher_logprobs=teacher.to(dtype),
        has_teacher=has_teacher,
        step=3,
    )


def make_topk(rows: int, seed: int = 1) -> TopK:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, T, 50, generator=g)
    top = torch.log_softmax(logits, -1).topk(K, dim=-1)
    student = append_tail_bucket(top.values)
    tlogits = logits + torch.randn(rows, T, 50, generator=g)
    teacher = append_tail_bucket(torch.log_softmax(tlogits, -1).gather(-1, top.indices))
    tp = torch.softmax(tlogits, -1)
    ent = -(tp * tp.clamp_min(1e-30).log()).sum(-1)
    return TopK(student.requires_grad_(), teacher, ent)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_algorithm_finite_on_one_batch(name: str, dtype: torch.dtype) -> None:
    algo = get_algorithm(name)
    batch = make_batch(dtype=dtype)
    prepared = algo.prepare(batch)
    assert prepared.advantages.shape == (B, T)
    assert prepared.advantages.dtype == torch.float32
    assert torch.isfinite(prepared.advantages).all()
    assert (prepared.advantages[batch.mask == 0] == 0).all()
    logprobs = (batch.old_logprobs.float() + 0.1).to(dtype).requires_grad_()
    topk = make_topk(B) if algo.needs_topk else None
    loss, metrics = algo.loss(logprobs, prepared, topk=topk)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [logprobs.grad] + ([topk.student_topk_logprobs.grad] if topk else [])
    total = sum(float(gr.abs().sum()) for gr in grads if gr is not None)
    assert total > 0, f"{name}: no gradient reached the student"
    assert all(isinstance(v, float) for v in metrics.values())
    assert all(isinstance(v, float) for v in prepared.metrics.values())


def test_rlrt_alpha_zero_is_grpo_exactly() -> None:
    batch = make_batch()
    grpo = get_algorithm("grpo", {"eps_high": 0.28, "agg": "token-mean"})
    rlrt = get_algorithm("rlrt", RLRTConfig(alpha=0.0))
    pg, pr = grpo.prepare(batch), rlrt.prepare(batch)
    assert torch.equal(pg.advantages, pr.advantages)
    a = group_advantages(batch.rewards, G)
    assert torch.equal(pg.advantages, a[:, None] * batch.mask)
    lp = batch.old_logprobs + 0.3 * torch.randn(B, T, generator=torch.Generator().manual_seed(2))
    lg, _ = grpo.loss(lp, pg)
    lr, _ = rlrt.loss(lp, pr)
    assert torch.equal(lg, lr)
    ref, _ = policy_loss(lp, batch.old_logprobs, a[:, None].expand(B, T), batch.mask)
    assert torch.equal(lg, ref)
    # with alpha = 1 the advantages really differ (the test above can fail)
    assert not torch.equal(get_algorithm("rlrt").prepare(batch).advantages, pg.advantages)


def test_microbatch_losses_sum_to_minibatch_loss() -> None:
    # SRPO's entropy weights are normalised step-wide only when the batch carries the entropy
    batch = dataclasses.replace(make_batch(), teacher_entropy=make_topk(B).teacher_entropy)
    lp = batch.old_logprobs + 0.2 * torch.randn(B, T, generator=torch.Generator().manual_seed(3))
    for name in sorted(ALGORITHMS):
        algo = get_algorithm(name)
        prepared = algo.prepare(batch)
        topk = make_topk(B) if algo.needs_topk else None
        full, _ = algo.loss(lp, prepared, topk=topk)
        n_tok, n_seq = prepared.normalizers()
        parts = 0.0
        for rows in (torch.tensor([0, 3, 5]), torch.tensor([1, 2, 4, 6, 7])):
            tk = TopK(*(x[rows] for x in topk)) if topk else None
            part, _ = algo.loss(lp[rows], prepared.select(rows), n_tok, tk, num_seqs=n_seq)
            parts = parts + part
        torch.testing.assert_close(parts, full, rtol=1e-6, atol=1e-7, msg=name)


def test_registry_attributes_and_configs() -> None:
    assert set(ALGORITHMS) == {"grpo", "dapo", "rlrt", "rlsd", "srpo", "sdpo"}
    expect = {
        "grpo": (False, None, 0),
        "dapo": (False, None, 0),
        "rlrt": (True, "peer", 0),
        "rlsd": (True, "reference", 0),
        "sdpo": (True, "peer", 100),
        "srpo": (True, "peer", 100),
    }
    for name, (needs_teacher, ctx, k) in expect.items():
        algo = get_algorithm(name)
        assert (algo.needs_teacher, algo.teacher_context, algo.needs_topk) == (
            needs_teacher,
            ctx,
            k,
        )
    assert get_algorithm("rlsd").teacher_weights == "snapshot"
    assert get_algorithm("rlsd").teacher_refresh_every == 10
    assert get_algorithm("sdpo").ema_rate == 0.05
    assert get_algorithm("dapo").dynamic_sampling and not get_algorithm("grpo").dynamic_sampling
    cfg = AlgorithmConfig(name="rlrt", rlrt=RLRTConfig(alpha=0.25))
    assert get_algorithm(cfg=cfg).cfg.alpha == 0.25
    assert dataclasses.asdict(cfg)["rlrt"]["eps_w"] == 0.2
    with pytest.raises(ValueError, match="unknown algorithm"):
        get_algorithm("ppo")
    with pytest.raises(ValueError, match="alpha"):
        RLRTConfig(alpha=1.5)
    with pytest.raises(ValueError, match="name"):
        AlgorithmConfig(name="nope")
