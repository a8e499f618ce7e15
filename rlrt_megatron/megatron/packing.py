"""Pack variable-length sequences into fixed-shape rows for Megatron forwards (pure torch).

Each sequence is `tokens[0:n]` whose last `n - r` tokens (from `response_start = r`) are the
response. Its log-probs are needed at positions r-1 .. n-2 (the position before a token predicts
it), so only those positions are "selected" for the LM head (see forward.py).

Sequences are placed first-fit-decreasing into rows of at most `token_budget` tokens; several
rollouts share a row back to back. Inside a row:
* position ids restart at 0 for every sequence;
* attention is block-diagonal causal: a token sees earlier tokens of its own sequence only. As a
  boolean mask `[rows, 1, L, L]` (True = masked, Megatron's convention) for the local spec, or as
  `cu_seqlens` for Transformer Engine's packed `thd` format (one row per micro-batch);
* padding at the row's end forms its own block, so no attention row is fully masked.

Routing replay (MoE): `routed[i]` `[m, layers, k]` holds the rollout engine's experts of the
first m tokens of sequence i (the engine never forwards a sequence's last token, so m is usually
n - 1). They land in `PackedMicroBatch.routed_experts` at their tokens' s-major positions; every
other position (a sequence's unrouted tail, row padding) gets experts 0..k-1. Those positions
reach no selected log-prob (block-causal attention), so what they are routed to changes nothing.

All micro-batches share one shape `[rows_per_microbatch, L]`, as pipeline parallelism needs
(activations of a fixed shape travel between stages); L is the longest row rounded up to
`pad_to_multiple` (capped at `token_budget`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["PackedMicroBatch", "balance_by_tokens", "block_causal_mask", "pack_sequences"]


@dataclass
class PackedMicroBatch:
    """One micro-batch of packed rows plus where its response log-probs go.

    input_ids / position_ids: `[R, L]`.
    attention_mask: `[R, 1, L, L]` bool, True = masked (None when built for `thd`).
    cu_seqlens: `[n_seqs + 1]` int32 cumulative sequence lengths over the flattened `[R * L]`
        tokens (row-major; row padding counted as one extra sequence per row).
    select: `[N]` indices into the s-major flattened hidden states `[L * R]` (Megatron's
        `[s, b, h]` layout: index = position * R + row) of the positions whose log-prob is needed.
    targets: `[N]` the token each selected position predicts.
    rollout_index: `[n]` global ids (input order) of the sequences in this micro-batch.
    dst_row / dst_col: `[N]` where each selected position's result goes in a `[n, T_resp]` block:
        row into `rollout_index`, column = position within the response.
    routed_experts: `[L * R, layers, k]` int64, s-major like `select`: the experts every token is
        replayed to in each MoE layer (None: the routers route themselves).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    cu_seqlens: torch.Tensor
    select: torch.Tensor
    targets: torch.Tensor
    rollout_index: torch.Tensor
    dst_row: torch.Tensor
    dst_col: torch.Tensor
    routed_experts: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """Response tokens (selected positions) in this micro-batch."""
        return int(self.select.numel())

    def to(self, device: torch.device | str) -> PackedMicroBatch:
        return PackedMicroBatch(
            **{
                k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
                for k, v in self.__dict__.items()
            }
        )


def block_causal_mask(seq_lens: Sequence[int], length: int) -> torch.Tensor:
    """`[length, length]` bool mask, True = masked: causal within each block, blocks disjoint.

    Blocks are consecutive segments of the given lengths; positions past their sum form one more
    block (padding), so every query row keeps at least itself unmasked.
    """
    seg = torch.empty(length, dtype=torch.int64)
    start = 0
    for i, n in enumerate(seq_lens):
        seg[start : start + n] = i
        start += n
    seg[start:] = len(seq_lens)
    pos = torch.arange(length)
    allowed = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    return ~allowed


def _first_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(budget - lengths[i])
    return rows


def pack_sequences(
    sequences: Sequence[Sequence[int]],
    response_starts: Sequence[int],
    token_budget: int,
    rows_per_microbatch: int = 1,
    *,
    pack: bool = True,
    pad_id: int = 0,
    pad_to_multiple: int = 8,
    with_mask: bool = True,
    routed: Sequence[torch.Tensor] | None = None,
) -> list[PackedMicroBatch]:
    """Pack `sequences` into micro-batches of `rows_per_microbatch` rows of <= `token_budget`.

    `pack=False` puts one sequence per row (the unpacked layout, same row length for all).
    `routed`: per sequence, the engine's experts of its first tokens (routing replay; see the
    module docstring). Raises ValueError for a sequence longer than the budget, a
    response_start out of range, or routed experts that do not fit their sequence.
    """
    if len(sequences) != len(response_starts):
        raise ValueError(
            f"{len(sequences)} sequences but {len(response_starts)} response starts: one each"
        )
    if token_budget < 1 or rows_per_microbatch < 1:
        raise ValueError(
            f"token_budget ({token_budget}) and rows_per_microbatch ({rows_per_microbatch}) "
            "must be >= 1"
        )
    lengths = [len(s) for s in sequences]
    for i, (n, r) in enumerate(zip(lengths, response_starts, strict=True)):
        if n > token_budget:
            raise ValueError(
                f"sequence {i} has {n} tokens, more than token_budget={token_budget}: raise the "
                "budget (it bounds one packed row) or truncate the sequence"
            )
        if not 1 <= r <= n:
            raise ValueError(
                f"sequence {i}: response_start={r} must lie in [1, {n}] (at least one token "
                "before the response, which predicts its first token)"
            )
    _check_routed(routed, lengths)
    if pack:
        rows = _first_fit_decreasing(lengths, token_budget)
    else:
        rows = [[i] for i in range(len(sequences))]
    longest = max((sum(lengths[i] for i in row) for row in rows), default=1)
    length = -(-longest // pad_to_multiple) * pad_to_multiple
    length = min(length, token_budget)
    while len(rows) % rows_per_microbatch:
        rows.append([])  # all-padding rows complete the last micro-batch

    out = []
    for m in range(0, len(rows), rows_per_microbatch):
        mb_rows = rows[m : m + rows_per_microbatch]
        n_rows = len(mb_rows)
        input_ids = torch.full((n_rows, length), pad_id, dtype=torch.int64)
        position_ids = torch.zeros((n_rows, length), dtype=torch.int64)
        mask = torch.empty((n_rows, 1, length, length), dtype=torch.bool) if with_mask else None
        experts = None if routed is None else _unrouted(n_rows * length, routed[0])
        cu = [0]
        select, targets, dst_row, dst_col, rollouts = [], [], [], [], []
        for b, row in enumerate(mb_rows):
            off = 0
            for i in row:
                seq = torch.as_tensor(list(sequences[i]), dtype=torch.int64)
                n, r = lengths[i], response_starts[i]
                input_ids[b, off : off + n] = seq
                position_ids[b, off : off + n] = torch.arange(n)
                pos = torch.arange(r - 1, n - 1)  # predicts tokens r .. n-1
                select.append((off + pos) * n_rows + b)
                targets.append(seq[pos + 1])
                dst_row.append(torch.full_like(pos, len(rollouts)))
                dst_col.append(pos - (r - 1))
                rollouts.append(i)
                if experts is not None:
                    m = routed[i].shape[0]
                    experts[(off + torch.arange(m)) * n_rows + b] = routed[i].long()
                off += n
                cu.append(cu[-1] + n)
            if off < length:
                cu.append(cu[-1] + length - off)
            if mask is not None:
                mask[b, 0] = block_causal_mask([lengths[i] for i in row], length)
        cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.int64)  # noqa: E731
        out.append(
            PackedMicroBatch(
                input_ids=input_ids,
                position_ids=position_ids,
                attention_mask=mask,
                cu_seqlens=torch.tensor(cu, dtype=torch.int32),
                select=cat(select),
                targets=cat(targets),
                rollout_index=torch.tensor(rollouts, dtype=torch.int64),
                dst_row=cat(dst_row),
                dst_col=cat(dst_col),
                routed_experts=experts,
            )
        )
    return out


def _check_routed(routed: Sequence[torch.Tensor] | None, lengths: Sequence[int]) -> None:
    if routed is None:
        return
    if len(routed) != len(lengths) or not routed:
        raise ValueError(f"{len(routed)} routed-expert tensors for {len(lengths)} sequences")
    shape = tuple(routed[0].shape[1:])
    for i, (r, n) in enumerate(zip(routed, lengths, strict=True)):
        if r.dim() != 3 or tuple(r.shape[1:]) != shape or r.shape[0] > n:
            raise ValueError(
                f"sequence {i} ({n} tokens): routed experts of shape {tuple(r.shape)}; expected "
                f"[<= {n}, {shape[0] if shape else '?'}, {shape[1] if shape else '?'}] (tokens, "
                "MoE layers, top-k) like every other sequence's: the engine's routing record does "
                "not match the batch"
            )


def _unrouted(tokens: int, like: torch.Tensor) -> torch.Tensor:
    """`[tokens, layers, k]` int64 filled with experts 0..k-1 (positions no log-prob reads)."""
    layers, k = like.shape[1], like.shape[2]
    return torch.arange(k, dtype=torch.int64).expand(tokens, layers, k).clone()


def balance_by_tokens(lengths: Sequence[int], parts: int) -> list[list[int]]:
    """Indices of `lengths` split into `parts` lists of about equal token sums (greedy
    largest-first, "LPT": each item, longest first, goes to the part with the fewest tokens so
    far; ties by the lower index). The largest part is at most 4/3 of the optimum; every part gets
    an item when there are at least `parts` items. Each part's indices come back in ascending
    order, and the result depends only on `lengths` (every rank computes the same split)."""
    if parts < 1:
        raise ValueError(f"balance_by_tokens: parts={parts} must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    loads = [0] * parts
    out: list[list[int]] = [[] for _ in range(parts)]
    for i in order:
        p = min(range(parts), key=lambda q: (loads[q], q))
        loads[p] += int(lengths[i])
        out[p].append(i)
    return [sorted(o) for o in out]
