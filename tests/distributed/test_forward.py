"""Response log-probs through the real Megatron model and schedules (gloo, 2 processes).

One spawn runs, on a tiny tied-embedding Qwen3 with a vocab (1000) that is not a multiple of
128 * tp, in turn TP=1/PP=1, TP=2 and PP=2 (same weights, re-sharded):
* packed and unpacked micro-batches vs a naive per-sequence full-logits reference (1e-5);
* student/teacher views: empty teacher context -> teacher == student exactly; a real teacher
  context lines up with the reference on (context + prompt + response); no-teacher rows are
  masked; top-k support + tail against the naive full-vocab reference;
* the update path (grad through forward_backward_func) vs the naive reference's parameter grads;
* PP: every stage receives the last stage's results.
Plus, at TP=1: the LM head only runs on response positions and never materialises their
logits (selected shape and peak RSS).
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed

VOCAB = 1000
TOKEN_BUDGET = 40
K = 6


def _hf_config(vocab: int = VOCAB, layers: int = 2):
    from rlrt_megatron.convert.tiny import tiny_config

    return tiny_config(vocab_size=vocab, tied=True, num_layers=layers)


def _rollouts():
    g = torch.Generator().manual_seed(3)
    tok = lambda n: torch.randint(0, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    shapes = [(5, 7), (12, 3), (3, 9), (8, 1), (6, 6), (10, 4), (4, 8)]  # (prompt, response)
    prompts = [tok(p) for p, _ in shapes]
    responses = [tok(r) for _, r in shapes]
    # Teacher prefix = teacher context + prompt; None = no teacher view for that rollout.
    prefixes = [
        tok(9) + p if i % 3 == 0 else (None if i == 4 else list(p)) for i, p in enumerate(prompts)
    ]
    weights = torch.randn(len(shapes), max(r for _, r in shapes), generator=g)
    return prompts, responses, prefixes, weights


def _naive(chunks, seqs, starts, t_resp):
    """Full forward per sequence, log_softmax over the whole (true) vocab; TP=1, PP=1 only."""
    model = chunks[0]
    lps = torch.zeros(len(seqs), t_resp)
    ents = torch.zeros(len(seqs), t_resp)
    tops = []
    for i, (s, r) in enumerate(zip(seqs, starts, strict=True)):
        ids = torch.tensor([s])
        pos = torch.arange(len(s))[None]
        logits = model(ids, pos, attention_mask=None)[0, :, :VOCAB].float()  # [n, V]
        lsm = torch.log_softmax(logits, -1)[r - 1 : len(s) - 1]
        tgt = torch.tensor(s[r:])
        lp = lsm.gather(-1, tgt[:, None]).squeeze(-1)
        lps[i, : len(tgt)] = lp.detach()
        ents[i, : len(tgt)] = -(lsm.exp() * lsm).sum(-1).detach()
        tops.append(lsm.detach())
    return lps, ents, tops


def _naive_topk(lsm_rows, ids):
    """log-probs at ids + tail from full log-softmax rows [n, V] and ids [n, K]."""
    mask = torch.ones_like(lsm_rows, dtype=torch.bool).scatter_(-1, ids, False)
    tail = torch.logsumexp(lsm_rows.masked_fill(~mask, float("-inf")), -1, keepdim=True)
    return torch.cat([lsm_rows.gather(-1, ids), tail], -1)


def _run_layout(tp: int, pp: int, full_params):
    import torch.distributed as dist

    from rlrt_megatron import platform
    from rlrt_megatron.megatron.forward import (
        forward_backward_responses,
        student_teacher_logprobs,
    )
    from rlrt_megatron.megatron.model import build_model
    from rlrt_megatron.megatron.packing import pack_sequences
    from rlrt_megatron.megatron.parallel import (
        gather_full_grads,
        gather_full_params,
        shard_state_dict_for_tp,
        wrap_with_ddp,
    )

    platform.init_distributed(tp=tp, pp=pp, seed=1234)
    chunks = build_model(_hf_config(), tp=tp, pp=pp)
    if full_params is not None:
        for c in chunks:
            c.load_state_dict(shard_state_dict_for_tp(full_params, c), strict=True)
    params = gather_full_params(chunks)
    prompts, responses, prefixes, weights = _rollouts()
    out: dict = {}
    common = dict(token_budget=TOKEN_BUDGET, with_entropy=True, topk=K)
    for name, rows in (("packed", 2), ("packed1", 1)):
        out[name] = student_teacher_logprobs(
            chunks, prompts, responses, prefixes, rows_per_microbatch=rows, **common
        )
    # Empty teacher contexts, teacher forward forced (teacher_chunks given): same packing ->
    # bit-identical results.
    out["empty_ctx"] = student_teacher_logprobs(
        chunks, prompts, responses, prompts, teacher_chunks=chunks, rows_per_microbatch=2, **common
    )
    # Unpacked: one rollout per row.
    from rlrt_megatron.megatron.forward import compute_response_logprobs

    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    starts = [len(p) for p in prompts]
    out["unpacked"] = compute_response_logprobs(
        chunks, seqs, starts, token_budget=TOKEN_BUDGET, pack=False, with_entropy=True
    )

    # Update path: loss = sum_i,t w_it * (logp_it + 0.3 * sum(topk_logprobs_it)) + 0.1 * H_it.
    # Megatron's schedule divides
    # each micro-batch's loss by the number of micro-batches (same packing in every layout).
    ddp = wrap_with_ddp(chunks)
    for c in ddp:
        c.zero_grad_buffer()

    # The top-k support is fixed from the logprobs phase (SDPO's update), log-probs at it + tail
    # get gradient.
    stored_ids = out["packed"][0].topk_ids

    def loss_fn(mb, o):
        w = weights[o["rollout_index"]]
        loss = (w * o["logprobs"] + 0.1 * o["entropy"]).sum()
        loss = loss + 0.3 * (w[..., None] * o["topk_logprobs"]).sum()
        return loss, {"loss": loss.detach().clone()}

    red = forward_backward_responses(
        ddp, seqs, starts, loss_fn, token_budget=TOKEN_BUDGET, rows_per_microbatch=2,
        with_entropy=True, response_len=weights.shape[1], topk_ids=stored_ids,
    )  # fmt: skip
    n_mb = len(pack_sequences(seqs, starts, TOKEN_BUDGET, 2))
    grads = {k: v * n_mb for k, v in gather_full_grads(ddp).items()}
    losses: list = [None] * dist.get_world_size()
    dist.all_gather_object(losses, [float(r["loss"]) for r in red])
    out["loss"] = sum(next(x for x in losses if x))
    out["grads"] = grads
    return params, out


def _lm_head_memory():
    """TP=1: logits only at response positions; peak RSS tracks response, not prompt, length."""
    from rlrt_megatron import platform
    from rlrt_megatron.megatron.forward import compute_response_logprobs
    from rlrt_megatron.megatron.model import build_model

    def rss_kib(field):
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith(field + ":"))

    vocab = 65536
    platform.init_distributed(tp=1, pp=1, seed=1)
    model = build_model(_hf_config(vocab=vocab, layers=1), tp=1, pp=1)
    shapes = []
    model[0].output_layer.register_forward_hook(lambda m, a, o: shapes.append(o[0].shape[0]))
    res = {}
    for name, (p, r) in {"long_prompt": (1024, 16), "long_response": (16, 1024)}.items():
        seq = torch.randint(0, vocab, (p + r,)).tolist()
        compute_response_logprobs(model, [seq], [p], token_budget=p + r)  # warm-up
        base = rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        compute_response_logprobs(model, [seq], [p], token_budget=p + r)
        res[name] = (rss_kib("VmHWM") - base) * 1024
    res["shapes"] = shapes
    return res


def _interleaved():
    """PP=2 with 2 virtual stages (interleaved schedule; micro-batches padded to a multiple of
    PP) vs TP=1/PP=1 on a 4-layer model: student log-probs + entropy + top-k, forward only."""
    from rlrt_megatron import platform
    from rlrt_megatron.megatron.forward import compute_response_logprobs
    from rlrt_megatron.megatron.model import build_model
    from rlrt_megatron.megatron.parallel import gather_full_params, shard_state_dict_for_tp

    prompts, responses, _, _ = _rollouts()
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    starts = [len(p) for p in prompts]
    kw = dict(token_budget=TOKEN_BUDGET, rows_per_microbatch=1, with_entropy=True, topk=K)
    out = []
    params = None
    for pp, vpp in ((1, None), (2, 2)):
        platform.init_distributed(tp=1, pp=pp, vpp=vpp, seed=5)
        chunks = build_model(_hf_config(layers=4), tp=1, pp=pp, vpp=vpp)
        if params is None:
            params = gather_full_params(chunks)
        else:
            for c in chunks:
                c.load_state_dict(shard_state_dict_for_tp(params, c), strict=True)
        out.append(compute_response_logprobs(chunks, seqs, starts, **kw))
    platform.init_distributed(tp=1, pp=1, seed=5)
    return out


def _worker(rank: int, world_size: int) -> dict:
    ref_params, ref = _run_layout(1, 1, None)
    results = {"ref": ref}
    # The naive reference on the same (TP=1) model.
    from rlrt_megatron import platform
    from rlrt_megatron.megatron.model import build_model
    from rlrt_megatron.megatron.parallel import shard_state_dict_for_tp

    platform.init_distributed(tp=1, pp=1, seed=1234)
    chunks = build_model(_hf_config(), tp=1, pp=1)
    chunks[0].load_state_dict(shard_state_dict_for_tp(ref_params, chunks[0]), strict=True)
    prompts, responses, prefixes, weights = _rollouts()
    t_resp = weights.shape[1]
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    starts = [len(p) for p in prompts]
    lps, ents, rows = _naive(chunks, seqs, starts, t_resp)
    results["naive"] = (lps, ents, rows)
    teacher_idx = [i for i, p in enumerate(prefixes) if p is not None]
    t_seqs = [prefixes[i] + responses[i] for i in teacher_idx]
    results["naive_teacher"] = (
        teacher_idx,
        *_naive(chunks, t_seqs, [len(prefixes[i]) for i in teacher_idx], t_resp),
    )
    # Naive grads of the same loss.
    chunks[0].zero_grad()
    total = 0.0
    for i, (s, r) in enumerate(zip(seqs, starts, strict=True)):
        logits = chunks[0](torch.tensor([s]), torch.arange(len(s))[None], attention_mask=None)
        lsm = torch.log_softmax(logits[0, r - 1 : len(s) - 1, :VOCAB].float(), -1)
        lp = lsm.gather(-1, torch.tensor(s[r:])[:, None]).squeeze(-1)
        ent = -(lsm.exp() * lsm).sum(-1)
        w = weights[i, : len(lp)]
        k_lp = _naive_topk(lsm, lsm.detach().topk(K, -1).indices)
        total = total + (w * lp).sum() + 0.1 * ent.sum() + 0.3 * (w[:, None] * k_lp).sum()
    total.backward()
    results["naive_loss"] = float(total.detach())
    results["naive_grads"] = {k: p.grad.clone() for k, p in chunks[0].named_parameters()}
    for tp, pp in ((2, 1), (1, 2)):
        _, results[(tp, pp)] = _run_layout(tp, pp, ref_params)
    results["vpp"] = _interleaved()
    results["memory"] = _lm_head_memory()
    return results


@pytest.mark.distributed
def test_response_logprobs_packed_teacher_grads_tp_pp():
    all_ranks = run_distributed(_worker, 2, timeout=600)
    for rank, res in enumerate(all_ranks):
        lps, ents, rows = res["naive"]
        prompts, responses, prefixes, weights = _rollouts()
        lengths = torch.tensor([len(r) for r in responses])
        mask = torch.arange(weights.shape[1])[None] < lengths[:, None]
        t_idx, t_lps, t_ents, t_rows = res["naive_teacher"]
        for layout in ("ref", (2, 1), (1, 2)):
            out = res[layout]
            where = f"rank {rank} layout {layout}"
            for name in ("packed", "packed1"):
                student, teacher = out[name]
                assert torch.equal(student.mask, mask), where
                torch.testing.assert_close(student.logprobs, lps, atol=1e-5, rtol=0)
                torch.testing.assert_close(student.entropy, ents * mask, atol=1e-5, rtol=0)
                # Top-k support = the naive top-k; log-probs at it + tail.
                for i, lsm in enumerate(rows):
                    n = len(responses[i])
                    ids = student.topk_ids[i, :n]
                    assert torch.equal(ids, lsm.topk(K, -1).indices), where
                    torch.testing.assert_close(
                        student.topk_logprobs[i, :n], _naive_topk(lsm, ids), atol=1e-5, rtol=0
                    )
                # Teacher: masked rows without a teacher; others equal the naive teacher view.
                assert not teacher.mask[4].any()
                assert torch.equal(teacher.mask[t_idx], mask[t_idx])
                torch.testing.assert_close(teacher.logprobs[t_idx], t_lps, atol=1e-5, rtol=0)
                torch.testing.assert_close(
                    teacher.entropy[t_idx], t_ents * mask[t_idx], atol=1e-5, rtol=0
                )
                for j, i in enumerate(t_idx):
                    n = len(responses[i])
                    ref_k = _naive_topk(t_rows[j], student.topk_ids[i, :n])
                    torch.testing.assert_close(
                        teacher.topk_logprobs[i, :n], ref_k, atol=1e-5, rtol=0
                    )
                # Empty teacher context (prefix == prompt): teacher == student exactly.
                same = [i for i in t_idx if prefixes[i] == prompts[i]]
                assert same and torch.equal(teacher.logprobs[same], student.logprobs[same]), where
            student, teacher = out["empty_ctx"]
            for name in ("logprobs", "mask", "entropy", "topk_ids", "topk_logprobs"):
                assert torch.equal(getattr(teacher, name), getattr(student, name)), (where, name)
            un = out["unpacked"]
            torch.testing.assert_close(un.logprobs, out["packed"][0].logprobs, atol=1e-5, rtol=0)
            torch.testing.assert_close(un.logprobs, lps, atol=1e-5, rtol=0)
            # Update path: loss and every gradient vs the naive per-sequence autograd.
            assert abs(out["loss"] - res["naive_loss"]) < 1e-4, where
            for name, g in res["naive_grads"].items():
                torch.testing.assert_close(
                    out["grads"][name],
                    g,
                    atol=1e-5,
                    rtol=1e-4,
                    msg=lambda m, n=name, w=where: f"{w} {n}: {m}",
                )
        ref_v, got_v = res["vpp"]
        for name in ("logprobs", "mask", "entropy", "topk_ids", "topk_logprobs", "topk_entropy"):
            torch.testing.assert_close(
                getattr(got_v, name), getattr(ref_v, name), atol=1e-5, rtol=0
            )
        mem = res["memory"]
        assert set(mem["shapes"]) == {16, 1024}  # the LM head never sees all 1040 positions
        # Full-position logits at 1040 tokens would be 1040 * 65536 * 4 B = 260 MiB, the
        # response's alone 256 MiB: the fused LM head + log-probs hold neither.
        assert max(mem["long_prompt"], mem["long_response"]) < 100 * 2**20, mem
