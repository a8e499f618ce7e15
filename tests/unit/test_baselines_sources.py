"""The baselines as their sources define them (issue 23): SDPO (Hubotter et al. 2026 and its
public code), SRPO (arXiv 2604.02288). Each test fails on the behaviour before the fix."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from recipes import get_recipe
from rlrt_megatron.algorithms import AlgoBatch, SDPOConfig, SRPOConfig, get_algorithm
from rlrt_megatron.trainer import steps

G = 4


def test_srpo_grpo_branch_is_unbiased() -> None:
    """SRPO's GRPO branch: A_i = r_i - mean_g(r), no division by the group std."""
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    mask = torch.ones(8, 3)
    algo = get_algorithm("srpo")
    prep = algo.prepare(
        AlgoBatch(
            rewards=rewards,
            group_size=G,
            mask=mask,
            old_logprobs=torch.zeros(8, 3),
            has_teacher=torch.zeros(8, dtype=torch.bool),
        )  # fmt: skip
    )
    want = rewards - rewards.view(2, G).mean(1).repeat_interleave(G)
    assert torch.allclose(prep.advantages[:, 0], want)
    assert get_recipe("qwen3_8b_srpo").algorithm.srpo.scale_by_std is False


@pytest.mark.parametrize("cls", [SDPOConfig, SRPOConfig])
def test_ema_rate_zero_is_a_frozen_teacher(cls) -> None:
    assert cls(ema_rate=0.0).ema_rate == 0.0
    with pytest.raises(ValueError, match="ema_rate"):
        cls(ema_rate=-0.1)


def test_frozen_teacher_is_not_moved_by_sync(monkeypatch) -> None:
    moved: list[float] = []
    run = SimpleNamespace(
        algo=get_algorithm("sdpo", ema_rate=0.0),
        teacher=[object()],
        policy=SimpleNamespace(ema_into=lambda t, r: moved.append(r)),
        rollouts=None,
    )
    monkeypatch.setattr(steps, "push_weights", lambda run, version: None)
    steps.sync(run, 3)
    assert moved == []


def test_paper_recipes_carry_the_published_hyperparameters() -> None:
    for model in ("qwen3_4b_base", "qwen3_8b", "llama3_8b"):
        sdpo = get_recipe(f"{model}_sdpo")
        assert sdpo.optimizer.lr == 1e-5
        assert sdpo.train.mini_batch_prompts == sdpo.train.prompts_per_step  # one update/step
        s = sdpo.algorithm.sdpo
        assert (s.topk, s.ema_rate, s.beta, s.is_clip) == (100, 0.05, 0.5, 2.0)
        assert sdpo.algorithm.rollout_correction.cap == 2.0
        srpo = get_recipe(f"{model}_srpo")
        assert srpo.optimizer.lr == 5e-6
        assert srpo.algorithm.srpo.entropy_beta == 1.0


class _FakePolicy:
    """Records what each mini-batch trained with; the 'student' is its number of updates."""

    dp_rank, dp_size = 0, 1
    last_nonfinite = None  # every mini-batch finite (train.on_nonfinite is not under test)

    def __init__(self) -> None:
        self.version = 0
        self.seen: list[int] = []

    def response_logprobs(
        self, prompts, responses, prefixes, *, token_budget, teacher, topk, routed=None
    ):
        b, t = len(prompts), max(len(r) for r in responses)
        ids = torch.full((b, t, topk), self.version, dtype=torch.long)
        lp = torch.full((b, t, topk + 1), float(self.version))
        return SimpleNamespace(topk_ids=ids), SimpleNamespace(topk_logprobs=lp)

    def train_minibatch(self, seqs, starts, rows, width, budget, loss_of, *, topk_ids,
                        teacher_topk, routed=None):  # fmt: skip
        assert routed is None  # a dense model: no MoE routing replay
        assert bool((teacher_topk[0] == topk_ids[..., :1].float()).all())
        self.seen.append(int(topk_ids[0, 0, 0]))
        self.version += 1
        return {"loss": 0.0}


@pytest.mark.parametrize("algo_name", ["sdpo", "srpo"])
def test_topk_support_comes_from_the_current_student_each_minibatch(algo_name) -> None:
    cfg = get_recipe(f"tiny_demo_{algo_name}", ["rollout.group_size=4", "train.prompts_per_step=4",
                                                "train.mini_batch_prompts=1"])  # fmt: skip
    algo = get_algorithm(cfg=cfg.algorithm)
    n, t, k = 16, 3, algo.needs_topk
    rewards = torch.tensor([1.0, 0.0] * 8)
    has = torch.ones(n, dtype=torch.bool)
    prepared = algo.prepare(
        AlgoBatch(
            rewards=rewards,
            group_size=4,
            mask=torch.ones(n, t),
            old_logprobs=torch.zeros(n, t),
            has_teacher=has,
            teacher_entropy=torch.zeros(n, t),
        )  # fmt: skip
    )
    batch = SimpleNamespace(
        responses=[[1, 2, 3]] * n, row_prompts=[[5]] * n, row_responses=[[1, 2, 3]] * n,
        teacher_prefixes=[[6, 5]] * n, teacher_used=[True] * n, width=t,
        topk_ids=torch.zeros(n, t, k, dtype=torch.long),  # the pre-update student's
        teacher_topk_logprobs=torch.zeros(n, t, k + 1), teacher_entropy=torch.zeros(n, t),
        routed=None,
    )  # fmt: skip
    pol = _FakePolicy()
    run = SimpleNamespace(cfg=cfg, policy=pol, algo=algo, teacher=None, step=0)
    steps.update(run, batch, prepared)
    # mini-batch j trains on the support of the student after j updates (today: always 0)
    assert pol.seen == [0, 1, 2, 3]
