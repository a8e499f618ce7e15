"""The ALGORITHMS registry: every algorithm on one batch, rlrt(alpha=0) == grpo exactly."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

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
    # loss metrics stay on the device (0-d, detached): the trainer reads them once per mini-batch
    assert all(
        torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in metrics.values()
    )
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


def _junk_masked(x: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    return torch.where(mask > 0, x, torch.full_like(x, value))


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_masked_positions_never_matter(name: str) -> None:
    batch = make_batch()
    m = batch.mask
    junk = dataclasses.replace(
        batch,
        old_logprobs=_junk_masked(batch.old_logprobs, m, float("nan")),
        student_logprobs=_junk_masked(batch.student_logprobs, m, 5.0),
        teacher_logprobs=_junk_masked(batch.teacher_logprobs, m, float("-inf")),
    )
    algo = get_algorithm(name)
    p0, p1 = algo.prepare(batch), algo.prepare(junk)
    assert torch.equal(p0.advantages, p1.advantages)
    lp = batch.old_logprobs + 0.1
    topk = make_topk(B) if algo.needs_topk else None
    junk_topk = None
    if topk:
        m3 = m[..., None].expand_as(topk.student_topk_logprobs)
        junk_topk = TopK(
            torch.where(m3 > 0, topk.student_topk_logprobs.detach(), float("nan")).requires_grad_(),
            torch.where(m3 > 0, topk.teacher_topk_logprobs, 3.0),
            _junk_masked(topk.teacher_entropy, m, float("nan")),
        )
    x0 = lp.clone().requires_grad_()
    x1 = _junk_masked(lp, m, 1e4).requires_grad_()
    l0, _ = algo.loss(x0, p0, topk=topk)
    l1, _ = algo.loss(x1, p1, topk=junk_topk)
    assert torch.equal(l0, l1)
    l0.backward()
    l1.backward()
    if name == "sdpo":  # only the top-k distributions carry gradient (IS weight is sg)
        assert x0.grad is None and x1.grad is None
    else:
        assert torch.equal(x0.grad, x1.grad) and (x1.grad[m == 0] == 0).all()
    if topk:
        g0, g1 = topk.student_topk_logprobs.grad, junk_topk.student_topk_logprobs.grad
        assert torch.equal(g0, g1)


def test_sdpo_distils_only_rows_with_teacher() -> None:
    batch = make_batch()
    algo = get_algorithm("sdpo")
    prepared = algo.prepare(batch)
    assert prepared.distill.tolist() == batch.has_teacher.tolist()
    topk = make_topk(B)
    lp = (batch.old_logprobs + 0.3).requires_grad_()  # ratio e^0.3 = 1.35 -> IS weight 1.35
    loss, _ = algo.loss(lp, prepared, topk=topk)
    loss.backward()
    from rlrt_megatron.algorithms import generalized_jsd

    jsd = generalized_jsd(topk.student_topk_logprobs, topk.teacher_topk_logprobs, 0.5)
    sel = batch.mask * batch.has_teacher[:, None]
    expect = (jsd * sel * math.exp(0.3)).sum() / sel.sum()
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-6)
    no_teacher = ~batch.has_teacher
    assert (topk.student_topk_logprobs.grad[no_teacher] == 0).all()
    assert (topk.student_topk_logprobs.grad[batch.has_teacher] != 0).any()
    assert lp.grad is None or (lp.grad == 0).all()  # the IS weight is stop-gradient
    # the IS weight is clipped at 2
    big, _ = algo.loss(batch.old_logprobs + 3.0, prepared, topk=topk)
    torch.testing.assert_close(big, (jsd * sel * 2.0).sum() / sel.sum(), rtol=1e-5, atol=1e-6)
    # sampled-token variant: sg(s - tau) * s on rows with a teacher
    sampled = get_algorithm("sdpo", variant="sampled")
    assert sampled.needs_topk == 0
    ps = sampled.prepare(batch)
    s = batch.old_logprobs.clone().requires_grad_()
    ls, _ = sampled.loss(s, ps)
    (grad,) = torch.autograd.grad(ls, s)
    expect_grad = (batch.old_logprobs - batch.teacher_logprobs) * sel / sel.sum()
    torch.testing.assert_close(grad, expect_grad, rtol=1e-5, atol=1e-7)


def test_srpo_routing_and_shared_denominator() -> None:
    batch = make_batch()
    algo = get_algorithm("srpo", entropy_beta=0.7)
    prepared = algo.prepare(batch)
    # z = incorrect and has a teacher: rows 1, 3, 7 (row 5 is correct; all have rewards 0/1)
    assert prepared.distill.tolist() == [False, True, False, True, False, False, False, True]
    z = prepared.distill
    assert (prepared.advantages[z] == 0).all()
    a = group_advantages(batch.rewards, G, scale_by_std=False)  # unbiased, as the paper
    torch.testing.assert_close(prepared.advantages[~z], (a[:, None] * batch.mask)[~z])
    topk = make_topk(B)
    lp = batch.old_logprobs + 0.05 * torch.randn(B, T, generator=torch.Generator().manual_seed(4))
    loss, metrics = algo.loss(lp, prepared, topk=topk)
    # by hand: PPO term on z = 0 tokens + entropy-weighted JSD on z = 1, over all tokens
    pg_mask = batch.mask * (~z)[:, None]
    sd_mask = batch.mask * z[:, None]
    ppo, _ = policy_loss(lp, batch.old_logprobs, prepared.advantages, pg_mask, 0.2, 0.28)
    ppo_sum = ppo * pg_mask.sum()
    from rlrt_megatron.algorithms import generalized_jsd

    jsd = generalized_jsd(topk.student_topk_logprobs, topk.teacher_topk_logprobs, 0.5)
    w = torch.exp(-0.7 * topk.teacher_entropy) * sd_mask
    w = w / (w.sum() / sd_mask.sum())
    c = torch.exp(lp - batch.old_logprobs).clamp(max=2.0)
    expect = (ppo_sum + (jsd * w * c * sd_mask).sum()) / batch.mask.sum()
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-6)
    assert "pg_clipfrac" in metrics and "sd_jsd_mean" in metrics
    # entropy weights: mean 1 on routed tokens, larger where the teacher is surer
    from rlrt_megatron.algorithms.registry import entropy_weights

    h = torch.tensor([[0.1, 2.0, 1.0], [5.0, 0.5, 0.0]])
    sel = torch.tensor([[True, True, True], [False, True, False]])
    ew = entropy_weights(h, sel, 1.0)
    assert float(ew[sel].mean()) == pytest.approx(1.0)
    assert (ew[~sel] == 0).all() and float(ew[0, 0]) > float(ew[1, 1]) > float(ew[0, 2])
    with pytest.raises(ValueError, match="topk"):
        algo.loss(lp, prepared)


def test_rlsd_lambda_follows_step_and_rlrt_ignores_rows_without_teacher() -> None:
    batch = make_batch()
    rlsd = get_algorithm("rlsd")
    late = rlsd.prepare(dataclasses.replace(batch, step=50))
    assert late.metrics["lam"] == 0.0
    grpo = get_algorithm("grpo").prepare(batch)
    assert torch.equal(late.advantages, grpo.advantages)
    early = rlsd.prepare(dataclasses.replace(batch, step=0))
    assert early.metrics["lam"] == 0.5 and not torch.equal(early.advantages, grpo.advantages)
    # teacher log-probs of rows without a teacher may be anything
    nan_rows = batch.teacher_logprobs.clone()
    nan_rows[~batch.has_teacher] = float("nan")
    rlrt = get_algorithm("rlrt")
    ref = rlrt.prepare(batch)
    got = rlrt.prepare(dataclasses.replace(batch, teacher_logprobs=nan_rows))
    assert torch.equal(ref.advantages, got.advantages)
    assert ref.metrics["asym/tokens_correct"] > 0


def test_prepare_invalid_batches() -> None:
    batch = make_batch()
    algo = get_algorithm("rlrt")
    with pytest.raises(ValueError, match=r"rewards.*\(8,\).*group_size=3"):
        algo.prepare(dataclasses.replace(batch, group_size=3))
    with pytest.raises(ValueError, match="teacher_logprobs.*required"):
        algo.prepare(dataclasses.replace(batch, teacher_logprobs=None))
    old = batch.old_logprobs.clone()
    old[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"old_logprobs.*\(8, 7\).*NaN"):
        algo.prepare(dataclasses.replace(batch, old_logprobs=old))
    with pytest.raises(ValueError, match=r"has_teacher.*\(7,\)"):
        algo.prepare(dataclasses.replace(batch, has_teacher=torch.ones(7, dtype=torch.bool)))
    teacher = batch.teacher_logprobs.clone()
    teacher[0, 1] = float("nan")
    with pytest.raises(ValueError, match="teacher_logprobs.*NaN"):
        algo.prepare(dataclasses.replace(batch, teacher_logprobs=teacher))


def test_prepared_select() -> None:
    prepared = get_algorithm("rlrt").prepare(make_batch())
    a = prepared.select([1, 3])
    b = prepared.select(torch.tensor([1, 3]))
    c = prepared.select(slice(1, 4, 2))
    for x in (a, b, c):
        assert x.num_rows == 2
        assert torch.equal(x.advantages, prepared.advantages[[1, 3]])
        assert x.metrics is prepared.metrics
    assert a.normalizers() == (float(make_batch().mask[[1, 3]].sum()), 2.0)


@pytest.mark.parametrize("name", ["sdpo", "srpo"])
def test_topk_accepts_named_objects_and_tuples(name: str) -> None:
    from rlrt_megatron.megatron.logprobs import TopKLogprobs  # what the trainer passes

    batch = make_batch()
    algo = get_algorithm(name)
    prepared = algo.prepare(batch)
    tk = make_topk(B)
    ref, _ = algo.loss(batch.old_logprobs, prepared, topk=tk)
    ids = torch.zeros(B, T, K, dtype=torch.long)
    mega = TopKLogprobs(
        ids=ids,
        student_logprobs=tk.student_topk_logprobs,
        teacher_logprobs=tk.teacher_topk_logprobs,
        teacher_entropy=tk.teacher_entropy,
        full_kl=None,
    )
    for form in (mega, tuple(tk)):
        got, _ = algo.loss(batch.old_logprobs, prepared, topk=form)
        assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="topk"):
        algo.loss(batch.old_logprobs, prepared, topk=[1, 2, 3, 4])


def test_import_needs_only_torch() -> None:
    code = (
        "import sys, rlrt_megatron.algorithms as a; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('megatron', 'transformers', 'transformer_engine', 'sglang')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_teacher_rows_and_skipped_teacher_forwards() -> None:
    batch = make_batch()
    r, ctx = batch.rewards, batch.has_teacher  # r = [1,0,1,0,1,1,1,0], ctx row 5 False
    correct = r > 0.5
    expect = {
        "grpo": torch.zeros(B, dtype=torch.bool),
        "dapo": torch.zeros(B, dtype=torch.bool),
        "rlrt": correct & ctx,
        "rlsd": ctx,
        "sdpo": ctx,
        "srpo": ~correct & ctx,
    }
    for name, rows in expect.items():
        assert torch.equal(get_algorithm(name).teacher_rows(r, ctx), rows), name
    assert torch.equal(get_algorithm("rlrt", reward_gate=False).teacher_rows(r, ctx), ctx)
    assert get_algorithm("rlrt").teacher_rows(r).tolist() == correct.tolist()
    # the trainer skips the teacher forward on the other rows: their values are ignored
    for name in ("rlrt", "rlsd"):
        algo = get_algorithm(name)
        rows = algo.teacher_rows(r, ctx)
        skipped = torch.where(rows[:, None], batch.teacher_logprobs, float("nan"))
        ref = algo.prepare(dataclasses.replace(batch, has_teacher=rows))
        got = algo.prepare(dataclasses.replace(batch, teacher_logprobs=skipped))
        assert torch.equal(ref.advantages, got.advantages), name
        assert got.metrics["asym/tokens_incorrect"] == (0.0 if name == "rlrt" else 18.0)
