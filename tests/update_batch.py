"""One PPO mini-batch of 6 rollouts with a real algorithm's loss, for `Policy.train_minibatch`
tests (the host-sync count, the PP metrics): `train(policy, algo_name)` runs it."""

from __future__ import annotations

from typing import Any

import torch

VOCAB = 256
PROMPT = 5
RESP = [3, 8, 6, 2, 7, 5]  # response lengths of the 6 rollouts (3 groups of 2)
K = 4
TOKEN_BUDGET = 26  # 2 rows of <= 13 tokens per micro-batch: 3 micro-batches


def prepared(algo_name: str) -> tuple[Any, Any, torch.Tensor | None, tuple | None]:
    """(algorithm with TIS on, its `Prepared`, top-k ids, teacher top-k) of the mini-batch;
    the old log-probs are far from any model, so clipping and truncation are active."""
    from rlrt_megatron.algorithms import AlgoBatch, RolloutCorrectionConfig, get_algorithm
    from rlrt_megatron.algorithms.losses import append_tail_bucket

    g = torch.Generator().manual_seed(0)
    n, width = len(RESP), max(RESP)
    mask = (torch.arange(width)[None, :] < torch.tensor(RESP)[:, None]).float()
    old = -torch.rand(n, width, generator=g) * 6
    algo = get_algorithm(algo_name, correction=RolloutCorrectionConfig(mode="tis", cap=2.0))
    batch = AlgoBatch(
        rewards=torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0]),
        group_size=2,
        mask=mask,
        old_logprobs=old,
        student_logprobs=old,
        teacher_logprobs=-torch.rand(n, width, generator=g),
        has_teacher=torch.ones(n, dtype=torch.bool),
        teacher_entropy=torch.rand(n, width, generator=g),
        rollout_logprobs=old + 0.3 * torch.randn(n, width, generator=g),
    )
    topk_ids = teacher = None
    if algo.needs_topk:
        base = torch.arange(n)[:, None, None] * 11 + torch.arange(width)[None, :, None] * 5
        topk_ids = (base + torch.arange(K)) % VOCAB  # distinct per position
        lp = torch.log_softmax(torch.randn(n, width, 20, generator=g), -1).topk(K, -1).values
        teacher = (append_tail_bucket(lp), batch.teacher_entropy)
    return algo, algo.prepare(batch), topk_ids, teacher


def train(policy: Any, algo_name: str) -> dict[str, float]:
    """One `train_minibatch` of every row on this rank. Every data-parallel rank trains on all
    rows with the whole mini-batch's normalisers, so DDP's average of equal gradients is the
    single-rank one (`steps.update` splits the rows and divides the normalisers instead)."""
    algo, prep, topk_ids, teacher = prepared(algo_name)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, VOCAB, (PROMPT + r,), generator=g).tolist() for r in RESP]
    rows = list(range(len(RESP)))
    nt, ns = prep.select(rows).normalizers()

    def loss_of(lp: torch.Tensor, sub: Any, tk: Any) -> tuple:
        return algo.loss(lp, prep.select(sub), nt, topk=tk, num_seqs=ns)

    return policy.train_minibatch(
        seqs, [PROMPT] * len(RESP), rows, max(RESP), TOKEN_BUDGET, loss_of,
        topk_ids=topk_ids, teacher_topk=teacher,
    )  # fmt: skip
