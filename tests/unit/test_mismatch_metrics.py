"""`rollout/logprob_abs_diff` compares engine and trainer log-probs under the SAME weights only;
tokens sampled with older weights (asynchronous / partial rollouts) go to
`rollout/stale_logprob_abs_diff` (the policy change, not an engine error)."""

from __future__ import annotations

import pytest
import torch

from rlrt_megatron.trainer.state import Batch
from rlrt_megatron.trainer.steps import mismatch_metrics


def _batch(token_versions: list[list[int]], sync: dict | None = None) -> Batch:
    b = Batch([], [], [], [], [], [], token_versions=token_versions)
    b.mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    b.student_logprobs = torch.zeros(2, 4)
    # |engine - trainer|: 0.001 on every version-3 token, 0.5 on older ones, 9 on padding
    b.behavior = torch.tensor([[-0.001, -0.5, -0.5, -9.0], [-0.001, -0.001, -9.0, -9.0]])
    b.sync_metrics = dict(sync or {})
    return b


def test_partial_rows_split_by_token_version():
    # row 0: token 0 sampled with v3, tokens 1-2 with v2 (a partial rollout continued); row 1: v3
    out = mismatch_metrics(_batch([[3, 2, 2], [3, 3]]), trainer_v=3)
    assert out["rollout/logprob_abs_diff"] == pytest.approx(0.001)
    assert out["rollout/stale_logprob_abs_diff"] == pytest.approx(0.5)


def test_synchronous_batch_has_no_stale_metric_and_unknown_version_counts_as_same():
    out = mismatch_metrics(_batch([[3, 3, 3], [-1, -1]]), trainer_v=3)
    assert out["rollout/logprob_abs_diff"] == pytest.approx((0.001 + 0.5 + 0.5 + 0.002) / 5)
    assert "rollout/stale_logprob_abs_diff" not in out


def test_all_tokens_stale_falls_back_to_the_same_version_sync_check():
    out = mismatch_metrics(_batch([[2, 2, 2], [2, 2]], {"rollout/sync_check_abs_diff": 2e-7}), 3)
    assert out["rollout/logprob_abs_diff"] == 2e-7
    assert out["rollout/stale_logprob_abs_diff"] == pytest.approx((0.001 + 1.0 + 0.002) / 5)
    assert "rollout/logprob_abs_diff" not in mismatch_metrics(_batch([[2, 2, 2], [2, 2]]), 3)
