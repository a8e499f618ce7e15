"""Packing of variable-length sequences into rows: layout, masks, selection bookkeeping."""

from __future__ import annotations

import pytest
import torch

from rlrt_megatron.megatron.packing import balance_by_tokens, block_causal_mask, pack_sequences


def test_block_causal_mask():
    m = block_causal_mask([2, 3], 6)
    allowed = ~m
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for blk in ([0, 1], [2, 3, 4], [5]):
        for i in blk:
            for j in blk:
                expected[i, j] = j <= i
    assert torch.equal(allowed, expected)


@pytest.mark.parametrize("pack,rows", [(True, 1), (True, 2), (False, 3)])
def test_pack_sequences_places_every_response_token(pack, rows):
    g = torch.Generator().manual_seed(0)
    seqs, starts = [], []
    for n, r in [(5, 2), (9, 4), (3, 3), (7, 1), (12, 6), (4, 2)]:
        seqs.append(torch.randint(1, 100, (n,), generator=g).tolist())
        starts.append(r)
    mbs = pack_sequences(seqs, starts, token_budget=16, rows_per_microbatch=rows, pack=pack)
    shapes = {tuple(mb.input_ids.shape) for mb in mbs}
    assert len(shapes) == 1 and next(iter(shapes))[0] == rows
    seen = {}
    for mb in mbs:
        r_, length = mb.input_ids.shape
        assert mb.attention_mask.shape == (r_, 1, length, length)
        flat_ids = mb.input_ids.t().reshape(-1)  # s-major like megatron's [s, b] hidden states
        flat_pos = mb.position_ids.t().reshape(-1)
        for j in range(mb.num_tokens):
            i = int(mb.rollout_index[mb.dst_row[j]])
            col = int(mb.dst_col[j])
            pos = int(mb.select[j])
            # The selected position holds the token just before response token `col`,
            # at its in-sequence position, and predicts the response token.
            assert int(flat_ids[pos]) == seqs[i][starts[i] - 1 + col]
            assert int(flat_pos[pos]) == starts[i] - 1 + col
            assert int(mb.targets[j]) == seqs[i][starts[i] + col]
            seen[(i, col)] = seen.get((i, col), 0) + 1
        # Every row's mask is block-diagonal causal over the sequences placed in it.
        for b in range(r_):
            m = mb.attention_mask[b, 0]
            assert not m.all(dim=-1).any()  # no fully masked query row
        assert int(mb.cu_seqlens[-1]) == r_ * length
    expected = {(i, c) for i in range(len(seqs)) for c in range(len(seqs[i]) - starts[i])}
    assert set(seen) == expected and set(seen.values()) == {1}
    if pack:
        assert sum(len(mb.rollout_index) for mb in mbs) == len(seqs)
        assert len(mbs) * rows < len(seqs)  # sequences actually share rows


def test_pack_sequences_errors():
    with pytest.raises(ValueError, match="more than token_budget"):
        pack_sequences([[1] * 10], [2], token_budget=8)
    with pytest.raises(ValueError, match="response_start"):
        pack_sequences([[1, 2, 3]], [0], token_budget=8)


def test_balance_by_tokens_greedy_largest_first():
    assert balance_by_tokens([5, 4, 3, 3, 3], 2) == [[0, 3], [1, 2, 4]]  # 8 | 10 (LPT)
    assert balance_by_tokens([1, 1, 1], 1) == [[0, 1, 2]]
    # a heavy tail: 80% short, 5% at the limit; by position one rank gets the long ones
    lengths = [40] * 26 + [300] * 4 + [2048] * 2
    parts = balance_by_tokens(lengths, 2)
    assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in p) for p in parts]
    assert max(loads) / (sum(loads) / 2) <= 1.1
    half = len(lengths) // 2
    by_position = [sum(lengths[:half]), sum(lengths[half:])]
    assert max(by_position) / (sum(lengths) / 2) > 1.5
    with pytest.raises(ValueError, match="parts"):
        balance_by_tokens([1], 0)


@pytest.mark.parametrize("pack,rows", [(True, 1), (True, 2), (False, 3)])
def test_pack_sequences_places_routed_experts_at_their_tokens(pack, rows):
    """Routing replay: the engine's experts of token p of sequence i land at that token's s-major
    position; a sequence's last (unrouted) token and row padding get experts 0..k-1."""
    g = torch.Generator().manual_seed(1)
    seqs, starts, routed = [], [], []
    for n, r in [(5, 2), (9, 4), (3, 2), (7, 1), (12, 6), (4, 2)]:  # r < n: found by select
        seqs.append(torch.randint(1, 100, (n,), generator=g).tolist())
        starts.append(r)
        routed.append(torch.randint(0, 8, (n - 1, 3, 2), generator=g, dtype=torch.uint8))
    mbs = pack_sequences(
        seqs, starts, token_budget=16, rows_per_microbatch=rows, pack=pack, routed=routed
    )
    filler = torch.arange(2).expand(3, 2)
    for mb in mbs:
        r_, length = mb.input_ids.shape
        assert mb.routed_experts.shape == (r_ * length, 3, 2)
        assert mb.routed_experts.dtype == torch.int64
        placed = torch.zeros(r_ * length, dtype=torch.bool)
        for k, i in enumerate(mb.rollout_index.tolist()):
            first = int(mb.select[mb.dst_row == k][0])  # (off + start - 1) * R + row
            b, off = first % r_, first // r_ - (starts[i] - 1)
            for p in range(len(seqs[i]) - 1):
                idx = (off + p) * r_ + b
                assert torch.equal(mb.routed_experts[idx], routed[i][p].long()), (i, p)
                placed[idx] = True
        assert (mb.routed_experts[~placed] == filler).all()
    with pytest.raises(ValueError, match=r"sequence 0 \(5 tokens\): routed experts of shape"):
        pack_sequences(seqs, starts, token_budget=16, routed=[torch.zeros(6, 3, 2)] + routed[1:])
