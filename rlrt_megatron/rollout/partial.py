"""Partial rollouts on the local engine: generations interrupted at a weight push and resumed
under the new weights from their partial tokens (`rollout.partial=true`).

The trainer keeps a pool of prompt groups (G rollouts each) between rounds; one round runs
between two weight pushes and produces one training batch:

1. new groups join the pool (the step's prompts); a group holding a token sampled more than
   `max_staleness` versions before the trainer that will train on it is *regenerated*: its
   tokens are dropped and it starts again from its prompt (counted in
   `rollout/partial_restarted`); groups are never split (GRPO needs all G rollouts together);
2. the engine continues every unfinished rollout from prompt + its partial tokens (the prefix is
   re-encoded under the current weights, as SGLang's abort + continue does) until enough groups
   have finished to fill the batch;
3. the batch is the first `prompts_per_step` finished groups in pool order (older groups first);
   the others stay in the pool, finished or not.

Every token keeps the weights version that sampled it and its behavior log-prob under that
version (`PoolRow.versions` / `.logprobs`), so the trainer's staleness metrics and the rollout
correction (TIS/MIS, per token) see the right behavior policy for each token. The order of work is
fixed by the loop (a round decodes until a group count is reached, never until a deadline), so a
run is reproducible and a resume from a checkpoint holding the pool continues it exactly.

Sampling: row (request i, sample j) of the prompts drawn at step s uses the uniforms of
`_row_generator(rollout.seed + s, i, j)` in order, whatever the number of interruptions: the t-th
token of a rollout always consumes its t-th uniform, and the `length_tail` workload's limits
apply as in `LocalEngine.generate`. Stop strings are not supported here (the trainer sends
none).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rlrt_megatron.rollout.base import SamplingParams


@dataclass
class PoolRow:
    """One rollout in progress: its tokens so far, their behavior log-probs and versions."""

    seed: int  # the step's sampling seed (rollout.seed + step that drew the prompt)
    request: int  # index of the prompt in that step's draw
    sample: int  # index within the group
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    reason: str | None = None  # "stop" | "length" once finished
    text: str = ""


@dataclass
class PoolGroup:
    """The G rollouts of one prompt (dataset index `idx`, prompt token ids `prompt`)."""

    idx: int
    prompt: list[int]
    rows: list[PoolRow]
    restarts: int = 0

    @property
    def done(self) -> bool:
        return all(r.reason is not None for r in self.rows)

    def oldest(self) -> int | None:
        vs = [min(r.versions) for r in self.rows if r.versions]
        return min(vs) if vs else None


def new_group(idx: int, prompt: list[int], seed: int, request: int, n: int) -> PoolGroup:
    return PoolGroup(idx, list(prompt), [PoolRow(seed, request, j) for j in range(n)])


@torch.no_grad()
def continue_rows(
    engine: Any, items: list[tuple], sampling: SamplingParams, need: int
) -> list[tuple[list[int], list[float], str | None, str]]:
    """Continue rollouts on a `LocalEngine` until `need` of their groups have finished.
    The engine's sampling settings are checked as by its `generate`.

    `items[i]` = (group id, prompt ids, tokens so far, seed, request, sample). Returns per item
    (new tokens, their log-probs, finish reason or None if interrupted, text of the whole response
    once finished). One left-padded batch; the host checks the group count after every token."""
    from transformers import DynamicCache

    from rlrt_megatron.rollout.local import _row_generator, _validate_sampling, length_cap

    _validate_sampling(sampling)

    dev, max_new = engine.device, sampling.max_new_tokens
    seqs = [list(p) + list(t) for _, p, t, *_ in items]
    caps = [
        length_cap(seed, req, smp, max_new) if engine.length_tail else max_new
        for _, _, _, seed, req, smp in items
    ]
    left = torch.tensor([c - len(t) for c, (_, _, t, *_) in zip(caps, items, strict=True)])
    b, width = len(seqs), max(len(s) for s in seqs)
    steps = int(left.max())
    ids = torch.full((b, width), engine.pad_token_id, dtype=torch.long)
    mask = torch.zeros((b, width + steps), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[r, width - len(s) :] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
    unif = None
    if sampling.temperature > 0:  # the t-th token of a rollout consumes its t-th uniform
        rows = []
        for _, _, t, seed, req, smp in items:
            u = torch.rand(max_new, generator=_row_generator(seed, req, smp), dtype=torch.float64)
            rows.append(torch.cat([u[len(t) :], u.new_zeros(len(t))])[: max(steps, 1)])
        unif = torch.stack(rows).to(dev)
    groups = [g for g, *_ in items]
    pending = {g: groups.count(g) for g in set(groups)}
    eos = set(engine.eos_token_ids)
    new_t: list[list[int]] = [[] for _ in items]
    new_lp: list[list[float]] = [[] for _ in items]
    reason: list[str | None] = [None] * b
    finished_groups = 0
    cache = DynamicCache(config=engine.model.config)
    logits = engine._forward(ids, mask[:, :width], pos, cache) if steps > 0 else None
    for step in range(steps):
        no_eos = left > step + 1 if engine.length_tail else None
        u = None if unif is None else unif[:, step]
        nxt, lp = engine._sample(
            logits, [], sampling, u, None if no_eos is None else no_eos.to(dev)
        )
        nxt_h, lp_h = nxt.tolist(), lp.tolist()
        for r in range(b):
            if reason[r] is not None:
                continue
            new_t[r].append(nxt_h[r])
            new_lp[r].append(lp_h[r])
            if nxt_h[r] in eos or len(new_t[r]) >= int(left[r]):
                reason[r] = "stop" if nxt_h[r] in eos else "length"
                pending[groups[r]] -= 1
                finished_groups += pending[groups[r]] == 0
        if finished_groups >= need or all(x is not None for x in reason):
            break
        pos = pos[:, -1:] + 1
        logits = engine._forward(nxt[:, None], mask[:, : width + step + 1], pos, cache)
    out = []
    for r, (_, _, t, *_) in enumerate(items):
        text = ""
        if reason[r] is not None:
            text = engine.tokenizer.decode(list(t) + new_t[r], skip_special_tokens=True)
        out.append((new_t[r], new_lp[r], reason[r], text))
    return out


def run_round(
    engine: Any,
    pool: list[PoolGroup],
    sampling: SamplingParams,
    *,
    batch_groups: int,
    oldest_allowed: int,
) -> tuple[list[PoolGroup], list[PoolGroup], dict[str, float]]:
    """One round (module docstring): (the batch's groups, the pool left, round metrics).

    `pool` (old groups first, then the new ones) is not modified; `oldest_allowed` is the
    oldest weights version a token of the batch may have (trainer version - max_staleness)."""
    import copy

    pool = copy.deepcopy(pool)
    restarted = 0
    for g in pool:
        old = g.oldest()
        if old is not None and old < oldest_allowed:
            g.rows = [PoolRow(r.seed, r.request, r.sample) for r in g.rows]
            g.restarts += 1
            restarted += 1
    have = sum(g.done for g in pool)
    version = int(engine.weight_version)
    items, where = [], []
    for gi, g in enumerate(pool):
        for ri, r in enumerate(g.rows):
            if r.reason is None:
                items.append((gi, g.prompt, r.tokens, r.seed, r.request, r.sample))
                where.append((gi, ri))
    if have < batch_groups and items:
        # a `ProcessEngine` continues in its process, a `LocalEngine` here
        cont = getattr(engine, "continue_rows", None)
        need = batch_groups - have
        outs = cont(items, sampling, need) if cont else continue_rows(engine, items, sampling, need)
        for (gi, ri), (toks, lps, reason, text) in zip(where, outs, strict=True):
            r = pool[gi].rows[ri]
            r.tokens += toks
            r.logprobs += lps
            r.versions += [version] * len(toks)
            r.reason, r.text = reason, text
    done = [g for g in pool if g.done][:batch_groups]
    if len(done) < batch_groups:
        raise RuntimeError(
            f"partial rollouts: {len(done)} of {batch_groups} groups finished although every "
            "rollout ran to rollout.max_new_tokens (a bug)"
        )
    taken = {id(g) for g in done}
    left = [g for g in pool if id(g) not in taken]
    resumed = sum(1 for g in done for r in g.rows if len(set(r.versions)) > 1)
    info = {
        "rollout/partial_restarted": float(restarted),
        "rollout/partial_resumed_rows": float(resumed),
        "rollout/partial_pool_groups": float(len(left)),
        "rollout/partial_decoded_rows": float(len(items)),
    }
    return done, left, info


def batch_payload(groups: list[PoolGroup], info: dict) -> tuple:
    """The broadcastable batch of finished groups (`trainer/rollouts.generate`'s layout plus
    per-token versions, the groups' dataset indices and the round metrics). A rollout's version
    is its oldest token's."""
    rows = [r for g in groups for r in g.rows]
    return (
        [list(g.prompt) for g in groups],
        [list(r.tokens) for r in rows],
        [r.text for r in rows],
        [list(r.logprobs) for r in rows],
        [r.reason or "length" for r in rows],
        [min(r.versions) if r.versions else -1 for r in rows],
        [list(r.versions) for r in rows],
        [g.idx for g in groups],
        info,
    )


__all__ = ["PoolGroup", "PoolRow", "batch_payload", "continue_rows", "new_group", "run_round"]
