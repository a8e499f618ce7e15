"""RLRT diagnostics on Hugging Face models (CPU is fine: these are analyses, not training).

Notation (DESIGN.md): student ``pi_S`` = the policy given the problem; teacher ``pi_T`` = the SAME
weights given the problem plus a peer's correct solution (the SDPO/RLRT teacher template,
`data.teacher.build_teacher_contexts`); for each sampled response token ``y_t``::

    s_t = log pi_S(y_t | x, y_<t),   tau_t = log pi_T(y_t | c, x, y_<t),   Delta_t = tau_t - s_t
    w_t = pi_S / pi_T = exp(-Delta_t)                     (RLRT's weight on correct rollouts)

1. **Delta along rollouts** (`delta_analysis`): per-token Delta; "explore" tokens = most
   negative mean Delta, i.e. largest ``w`` (the student chose against the teacher; RLRT
   up-weights them on correct rollouts), "exploit" tokens = largest mean Delta, smallest ``w``
   (the teacher is surer than the student),
   both on correct rollouts (all rollouts when there are none, marked ``scope="all"``).
2. **Reflection injection** (`reflection_injection`): the phrase (default "Wait, let me
   reconsider.") is inserted before the token of max Delta, of min Delta and at a random position;
   the student continues from there and the result is scored again.
   ``flipR = P(wrong after | right before)``, ``flipW = P(right after | wrong before)``.
3. **Policy vs base** (`jsd_analysis`): along the policy's own rollouts, per position the
   Jensen-Shannon divergence ``JSD = 1/2 KL(P || M) + 1/2 KL(B || M)``, ``M = (P + B) / 2``
   (nats, <= ln 2) between the full next-token distributions of the policy P and the base B;
   reported as the fraction of tokens above thresholds and the top-k overlap
   ``|top_k(P) ∩ top_k(B)| / k``.

Plots (PNG, matplotlib Agg) are drawn by `eval.plots`; `rlrt analyze` writes them with
`analysis.json` into `--out`.
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlrt_megatron.data.teacher import build_teacher_contexts
from rlrt_megatron.data.templates import PromptTemplate, render_prompt, tokenize_text
from rlrt_megatron.eval.benchmarks import Benchmark
from rlrt_megatron.eval.runner import problem_seed
from rlrt_megatron.rollout.base import GenerateRequest, SamplingParams

logger = logging.getLogger(__name__)

REFLECTION_PHRASE = "Wait, let me reconsider."
POSITION_KINDS = ("max_delta", "random", "min_delta")
ANALYSES = ("delta", "reflection", "jsd")


@dataclass
class Rollout:
    """One sampled response with its score and (after `compute_deltas`) its per-token
    student / teacher log-probs (float32 tensors of length `len(response_ids)`)."""

    benchmark: str
    problem_index: int
    sample: int
    problem: str
    answer: str
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    reward: float
    finish_reason: str = "stop"
    teacher_source: str | None = None  # "peer" | "reference" | None (no teacher context)
    student_logprobs: torch.Tensor | None = None
    teacher_logprobs: torch.Tensor | None = None

    @property
    def correct(self) -> bool:
        return self.reward >= 0.5

    @property
    def delta(self) -> torch.Tensor | None:
        """``Delta_t = tau_t - s_t`` (None without a teacher)."""
        if self.student_logprobs is None or self.teacher_logprobs is None:
            return None
        return self.teacher_logprobs - self.student_logprobs

    @property
    def key(self) -> str:
        return f"{self.benchmark}/{self.problem_index}/{self.sample}"


# --------------------------------------------------------------------------- log-probs
def _vocab_limit(tokenizer: Any, model: Any) -> int:
    rows = int(model.get_output_embeddings().weight.shape[0])
    return min(len(tokenizer), rows)


@torch.no_grad()
def response_logits(
    model: Any, prefix_ids: Sequence[int], response_ids: Sequence[int], vocab_size: int
) -> torch.Tensor:
    """float32 logits ``[T, V]`` predicting each response token (ids >= `vocab_size`, padded
    embedding rows, get -inf as in the rollout engines)."""
    device = next(model.parameters()).device
    ids = torch.tensor([[*prefix_ids, *response_ids]], dtype=torch.long, device=device)
    t = len(response_ids)
    # the logits at positions len(prefix)-1 .. L-2 predict the response tokens
    logits = model(input_ids=ids, logits_to_keep=t + 1).logits[0, :-1].float()
    if logits.shape[-1] > vocab_size:
        logits[:, vocab_size:] = float("-inf")
    return logits


@torch.no_grad()
def sampled_logprobs(
    model: Any, prefix_ids: Sequence[int], response_ids: Sequence[int], vocab_size: int
) -> torch.Tensor:
    """``log pi(y_t | prefix, y_<t)`` for every response token, float32 ``[T]`` on the CPU."""
    if not response_ids:
        return torch.zeros(0)
    logits = response_logits(model, prefix_ids, response_ids, vocab_size)
    target = torch.tensor(response_ids, device=logits.device)[:, None]
    out = logits.gather(1, target)[:, 0] - torch.logsumexp(logits, dim=-1)
    return out.cpu()


# --------------------------------------------------------------------------- rollouts
def sample_rollouts(
    engine: Any,
    tokenizer: Any,
    benchmarks: Sequence[Benchmark],
    k: int,
    reward: Any,
    *,
    template: PromptTemplate,
    temperature: float = 1.0,
    max_new_tokens: int = 512,
    seed: int = 0,
) -> list[Rollout]:
    """k rollouts per problem (problem-seeded like `rlrt eval`), scored by `reward`."""
    out: list[Rollout] = []
    for bench in benchmarks:
        for prob in bench.problems:
            ids = render_prompt(tokenizer, prob.problem, template).token_ids
            sp = SamplingParams(
                n=k,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                seed=problem_seed(seed, bench.name, prob.uid),
            )
            comps = engine.generate([GenerateRequest(ids, f"{bench.name}/{prob.uid}")], sp)[0]
            scores = reward([c.text for c in comps], [prob.answer] * len(comps)).scores
            out.extend(
                Rollout(
                    bench.name,
                    prob.index,
                    j,
                    prob.problem,
                    prob.answer,
                    list(ids),
                    list(c.token_ids),
                    c.text,
                    float(s),
                    c.finish_reason,
                )
                for j, (c, s) in enumerate(zip(comps, scores, strict=True))
            )
    return out


def compute_deltas(
    model: Any,
    tokenizer: Any,
    rollouts: list[Rollout],
    k: int,
    *,
    template: PromptTemplate,
    teacher: str = "peer-or-reference",
    seed: int = 0,
) -> None:
    """Fill `student_logprobs` / `teacher_logprobs` of every rollout that gets a teacher.

    `teacher`: ``peer`` (RLRT: another correct rollout of the same problem, none -> no Delta),
    ``reference`` (the reference answer, RLSD-style), or ``peer-or-reference`` (peer when the
    group has another correct rollout, else the reference answer: analyses of weak models).
    """
    if teacher not in ("peer", "reference", "peer-or-reference"):
        raise ValueError(f"--teacher {teacher!r}: choose peer, reference or peer-or-reference")
    if len(rollouts) % k:
        raise ValueError(f"compute_deltas: {len(rollouts)} rollouts is not a multiple of k={k}")
    vocab = _vocab_limit(tokenizer, model)
    groups = [rollouts[i : i + k] for i in range(0, len(rollouts), k)]
    common = dict(tokenizer=tokenizer, prompt_template=template, seed=seed)
    problems = [g[0].problem for g in groups]
    texts = [r.text for r in rollouts]
    rewards = [r.reward for r in rollouts]
    ctx: list = [None] * len(rollouts)
    if teacher != "reference":
        ctx = build_teacher_contexts(problems, texts, rewards, k, mode="peer", **common)
    if teacher != "peer":
        refs = [f"The answer is \\boxed{{{g[0].answer}}}." for g in groups]
        ref_ctx = build_teacher_contexts(
            problems, texts, rewards, k, mode="reference", references=refs, **common
        )
        ctx = [c if c is not None else r for c, r in zip(ctx, ref_ctx, strict=True)]
    for r, c in zip(rollouts, ctx, strict=True):
        r.student_logprobs = sampled_logprobs(model, r.prompt_ids, r.response_ids, vocab)
        if c is None:
            r.teacher_source, r.teacher_logprobs = None, None
            continue
        r.teacher_source = c.source
        r.teacher_logprobs = sampled_logprobs(model, c.token_ids, r.response_ids, vocab)


# --------------------------------------------------------------------------- 1. Delta
def token_text(tokenizer: Any, token_id: int) -> str:
    """A token as readable, printable text: spaces as '␣', newlines as '\\n', other control
    characters as '\\xNN'; a token that is part of a multi-byte character (decodes to U+FFFD)
    is shown as its raw vocabulary entry."""
    s = tokenizer.decode([int(token_id)])
    if "\ufffd" in s or not s:
        s = str(tokenizer.convert_ids_to_tokens(int(token_id)))
    s = s.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t")
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in s)


def explore_exploit_tokens(
    rollouts: Sequence[Rollout], tokenizer: Any, top: int = 15, min_count: int = 2
) -> dict[str, Any]:
    """Token types ranked by their mean Delta (the log of the geometric-mean RLRT weight,
    ``exp(-mean_t Delta_t)``; the arithmetic mean of ``w`` is dominated by single outliers).

    Explore = most negative mean Delta (largest w = pi_S / pi_T), exploit = most positive.
    Scope: tokens of correct rollouts with a teacher (``scope="correct"``); all rollouts with a
    teacher when no correct one has (``scope="all"``). Token types seen fewer than `min_count`
    times are left out unless fewer than `top` types would remain.
    Returns ``{"scope", "n_tokens", "explore": [...], "exploit": [...], "top_occurrences"}``;
    token entries ``{"token", "token_id", "count", "mean_delta", "geo_mean_w", "mean_w"}``,
    occurrences (the `top` single tokens of largest w) ``{"rollout", "position", "token", "w",
    "delta", "context"}``.
    """
    with_t = [r for r in rollouts if r.delta is not None and len(r.response_ids)]
    scope = "correct" if any(r.correct for r in with_t) else "all"
    chosen = [r for r in with_t if r.correct] if scope == "correct" else with_t
    acc: dict[int, list[float]] = defaultdict(list)
    occurrences: list[tuple[float, Rollout, int]] = []
    for r in chosen:
        for t, (tid, d) in enumerate(zip(r.response_ids, r.delta.tolist(), strict=True)):  # type: ignore[union-attr]
            acc[int(tid)].append(float(d))
            occurrences.append((float(d), r, t))
    rows = [
        {
            "token": token_text(tokenizer, tid),
            "token_id": tid,
            "count": len(ds),
            "mean_delta": sum(ds) / len(ds),
            "geo_mean_w": math.exp(-sum(ds) / len(ds)),
            "mean_w": sum(math.exp(-d) for d in ds) / len(ds),
        }
        for tid, ds in acc.items()
    ]
    frequent = [r for r in rows if r["count"] >= min_count]
    if len(frequent) >= min(top, len(rows)):
        rows = frequent
    occurrences.sort(key=lambda x: x[0])
    return {
        "scope": scope,
        "n_tokens": sum(len(v) for v in acc.values()),
        "explore": sorted(rows, key=lambda r: (r["mean_delta"], r["token_id"]))[:top],
        "exploit": sorted(rows, key=lambda r: (-r["mean_delta"], r["token_id"]))[:top],
        "top_occurrences": [
            {
                "rollout": r.key,
                "position": t,
                "token": token_text(tokenizer, r.response_ids[t]),
                "w": math.exp(-d),
                "delta": d,
                "context": tokenizer.decode(r.response_ids[max(0, t - 12) : t]),
            }
            for d, r, t in occurrences[:top]
        ],
    }


def delta_stats(rollouts: Sequence[Rollout]) -> dict[str, float]:
    """`algorithms.diagnostics.asymmetry_stats` over the rollouts that have a teacher."""
    from rlrt_megatron.algorithms.diagnostics import asymmetry_stats

    rs = [r for r in rollouts if r.delta is not None and len(r.response_ids)]
    if not rs:
        return {"rollouts_with_teacher": 0.0}
    t = max(len(r.response_ids) for r in rs)
    s = torch.zeros(len(rs), t)
    tau = torch.zeros(len(rs), t)
    mask = torch.zeros(len(rs), t)
    for i, r in enumerate(rs):
        n = len(r.response_ids)
        s[i, :n], tau[i, :n], mask[i, :n] = r.student_logprobs, r.teacher_logprobs, 1.0
    rewards = torch.tensor([r.reward for r in rs])
    out = asymmetry_stats(s, tau, mask, rewards)
    out["rollouts_with_teacher"] = float(len(rs))
    out["rollouts_peer_teacher"] = float(sum(r.teacher_source == "peer" for r in rs))
    # the trainer's names (`trainer/steps.py:teacher_metrics`, `rlrt compare`'s teacher table)
    if out["tokens_correct"]:
        out["delta/correct_mean"] = out["delta_mean_correct"]
    if out["tokens_incorrect"]:
        out["delta/wrong_mean"] = out["delta_mean_incorrect"]
    if "delta/correct_mean" in out and "delta/wrong_mean" in out:
        out["delta/gap"] = out["delta/correct_mean"] - out["delta/wrong_mean"]
    return out


def teacher_probe(
    engine: Any, tokenizer: Any, rollouts: Sequence[Rollout], k: int, reward: Any, **kw: Any
) -> dict[str, float]:
    """The trainer's eval teacher probe (`eval.teacher_probe.teacher_eval_metrics`) on these
    rollouts (k per problem): `eval/teacher/<bench>/avg@k` vs `student_avg@k`. `kw`:
    `sampling`, `teacher_template`, `template`."""
    from types import SimpleNamespace

    from rlrt_megatron.eval.teacher_probe import teacher_eval_metrics

    records: dict[str, list[dict]] = {}
    problems: dict[tuple[str, str], Any] = {}
    for i in range(0, len(rollouts), k):
        group = rollouts[i : i + k]
        r0 = group[0]
        uid = str(r0.problem_index)
        records.setdefault(r0.benchmark, []).append(
            {"uid": uid, "scores": [r.reward for r in group], "responses": [r.text for r in group]}
        )
        problems[(r0.benchmark, uid)] = SimpleNamespace(problem=r0.problem, answer=r0.answer)
    return teacher_eval_metrics(engine, records, problems, tokenizer=tokenizer, reward=reward, **kw)


def delta_analysis(rollouts: Sequence[Rollout], tokenizer: Any, top: int = 15) -> dict:
    return {"stats": delta_stats(rollouts), **explore_exploit_tokens(rollouts, tokenizer, top)}


# --------------------------------------------------------------------------- 2. reflection
def content_length(r: Rollout, eos_ids: Sequence[int]) -> int:
    """Response tokens before a final eos (insertion positions are 0 .. this - 1)."""
    n = len(r.response_ids)
    return n - 1 if n and r.response_ids[-1] in set(eos_ids) else n


def injection_positions(r: Rollout, eos_ids: Sequence[int], seed: int = 0) -> dict[str, int]:
    """``{"max_delta": argmax_t Delta_t, "min_delta": argmin_t Delta_t, "random": t ~ U}`` over
    the content tokens; {} when the rollout has no teacher or no content."""
    n = content_length(r, eos_ids)
    d = r.delta
    if d is None or n < 1:
        return {}
    d = d[:n]
    rng = random.Random(f"{seed}:{r.key}")
    return {
        "max_delta": int(torch.argmax(d)),
        "random": rng.randrange(n),
        "min_delta": int(torch.argmin(d)),
    }


def flip_rates(before: Sequence[float], after: Sequence[float]) -> dict[str, float]:
    """``flipR = sum_{right} (1 - after) / #right``, ``flipW = sum_{wrong} after / #wrong``
    (`after` may be a mean over several continuations); NaN where the group is empty."""
    right = [a for b, a in zip(before, after, strict=True) if b >= 0.5]
    wrong = [a for b, a in zip(before, after, strict=True) if b < 0.5]
    return {
        "flipR": sum(1.0 - a for a in right) / len(right) if right else math.nan,
        "flipW": sum(wrong) / len(wrong) if wrong else math.nan,
        "n_right": float(len(right)),
        "n_wrong": float(len(wrong)),
    }


def reflection_injection(
    engine: Any,
    tokenizer: Any,
    rollouts: Sequence[Rollout],
    reward: Any,
    *,
    phrase: str = REFLECTION_PHRASE,
    samples: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 512,
    seed: int = 0,
) -> dict[str, Any]:
    """Insert `phrase` at the max-Delta, random and min-Delta positions of every rollout with a
    teacher, continue sampling (`samples` continuations each, budget `max_new_tokens - t`, at
    least 16) and rescore. Returns ``{kind: {"flipR", "flipW", "n_right", "n_wrong"}}`` plus
    ``"examples"`` (a few texts) and the phrase."""
    eos = list(getattr(engine, "eos_token_ids", []) or [])
    lead = tokenize_text(tokenizer, " " + phrase)
    jobs: list[tuple[str, Rollout, int]] = []
    for r in rollouts:
        for kind, t in injection_positions(r, eos, seed).items():
            jobs.append((kind, r, t))
    result: dict[str, Any] = {"phrase": phrase, "samples": samples, "examples": []}
    if not jobs:
        for kind in POSITION_KINDS:
            result[kind] = flip_rates([], [])
        return result
    after: dict[str, list[float]] = defaultdict(list)
    before: dict[str, list[float]] = defaultdict(list)
    # one call per budget (the continuation budget depends on t), seeded by the rollout
    for kind, r, t in jobs:
        prefix = [*r.prompt_ids, *r.response_ids[:t], *lead]
        sp = SamplingParams(
            n=samples,
            temperature=temperature,
            max_new_tokens=max(16, max_new_tokens - t),
            seed=problem_seed(seed, kind, r.key),
        )
        comps = engine.generate([GenerateRequest(prefix, f"{kind}/{r.key}")], sp)[0]
        head = tokenizer.decode(r.response_ids[:t], skip_special_tokens=True)
        texts = [f"{head} {phrase}{c.text}" for c in comps]
        scores = reward(texts, [r.answer] * len(texts)).scores
        before[kind].append(r.reward)
        after[kind].append(sum(float(s) for s in scores) / len(scores))
        if len(result["examples"]) < 6 and kind != "random":
            result["examples"].append(
                {
                    "kind": kind,
                    "rollout": r.key,
                    "position": t,
                    "before": r.reward,
                    "after": after[kind][-1],
                    "text": texts[0][-400:],
                }
            )
    for kind in POSITION_KINDS:
        result[kind] = flip_rates(before[kind], after[kind])
    return result


# --------------------------------------------------------------------------- 3. JSD
@torch.no_grad()
def policy_base_divergence(
    policy: Any,
    base: Any,
    prefix_ids: Sequence[int],
    response_ids: Sequence[int],
    vocab_size: int,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 256,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Per response position: ``JSD(P_t, B_t)`` (nats, [T]) and the top-k overlaps
    ``|top_k(P_t) ∩ top_k(B_t)| / k`` ([T] per k), P = policy, B = base."""
    from rlrt_megatron.algorithms.losses import generalized_jsd

    lp = response_logits(policy, prefix_ids, response_ids, vocab_size)
    lb = response_logits(base, prefix_ids, response_ids, vocab_size).to(lp.device)
    jsd, overlap = [], {k: [] for k in ks}
    for lo in range(0, lp.shape[0], chunk):
        p = torch.log_softmax(lp[lo : lo + chunk], dim=-1)
        b = torch.log_softmax(lb[lo : lo + chunk], dim=-1)
        jsd.append(generalized_jsd(p, b, beta=0.5).clamp(min=0.0))
        for k in ks:
            kk = min(k, vocab_size)
            tp = torch.topk(p, kk, dim=-1).indices
            tb = torch.topk(b, kk, dim=-1).indices
            hits = (tp[:, :, None] == tb[:, None, :]).any(-1).sum(-1)
            overlap[k].append(hits.float() / kk)
    return torch.cat(jsd).cpu(), {k: torch.cat(v).cpu() for k, v in overlap.items()}


def jsd_analysis(
    policy: Any,
    base: Any,
    tokenizer: Any,
    rollouts: Sequence[Rollout],
    *,
    thresholds: Sequence[float] = (0.01, 0.05, 0.1, 0.3),
    ks: Sequence[int] = (1, 5, 10),
    top: int = 15,
) -> dict[str, Any]:
    """JSD of the policy vs the base along the policy's rollouts (module docstring).

    Returns ``{"n_tokens", "mean_jsd", "median_jsd", "frac_above": {tau: f},
    "topk_overlap": {k: mean}, "top_tokens": [...], "_per_token": tensor, "_relpos": tensor}``
    (keys starting with `_` are for the plots, not the JSON).
    """
    vocab = min(_vocab_limit(tokenizer, policy), _vocab_limit(tokenizer, base))
    all_jsd, rel, tops = [], [], []
    overlaps: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for r in rollouts:
        if not r.response_ids:
            continue
        j, ov = policy_base_divergence(policy, base, r.prompt_ids, r.response_ids, vocab, ks)
        all_jsd.append(j)
        rel.append((torch.arange(len(j)) + 0.5) / len(j))
        for k in ks:
            overlaps[k].append(ov[k])
        for t, v in enumerate(j.tolist()):
            tops.append((v, r, t))
    if not all_jsd:
        return {"n_tokens": 0}
    per_token = torch.cat(all_jsd)
    tops.sort(key=lambda x: -x[0])
    return {
        "n_tokens": int(per_token.numel()),
        "mean_jsd": float(per_token.mean()),
        "median_jsd": float(per_token.median()),
        "frac_above": {str(t): float((per_token > t).float().mean()) for t in thresholds},
        "topk_overlap": {str(k): float(torch.cat(overlaps[k]).mean()) for k in ks},
        "top_tokens": [
            {
                "rollout": r.key,
                "position": t,
                "jsd": v,
                "token": token_text(tokenizer, r.response_ids[t]),
                "context": tokenizer.decode(r.response_ids[max(0, t - 12) : t]),
            }
            for v, r, t in tops[:top]
        ],
        "_per_token": per_token,
        "_relpos": torch.cat(rel),
    }
