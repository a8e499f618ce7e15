"""The trainer's teacher views: which rollouts get a teacher forward (the rows the algorithm uses,
plus a few probe rows for the diagnostics), the teacher-prompt cap, the per-step teacher metrics
and the warning when the teacher does not separate right from wrong rollouts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from recipes import get_recipe
from rlrt_megatron.algorithms import get_algorithm
from rlrt_megatron.convert.tiny import build_tokenizer
from rlrt_megatron.data import PromptTemplate
from rlrt_megatron.data.datasets import PromptRow
from rlrt_megatron.trainer import steps, teacher
from rlrt_megatron.trainer.state import Batch

G = 4


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(vocab_size=512, seed=0, n_texts=400)


def _run(tok, algo: str, *overrides: str) -> SimpleNamespace:
    cfg = get_recipe("tiny_demo", [f"algorithm.name={algo}", f"rollout.group_size={G}", *overrides])
    return SimpleNamespace(
        cfg=cfg,
        algo=get_algorithm(cfg=cfg.algorithm),
        tokenizer=tok,
        prompt_template=PromptTemplate(instruction=""),
        pad_id=0,
        extra={},
        logger=SimpleNamespace(messages=[], message=lambda s: None),
    )


def _batch(tok, rewards: list[float]) -> Batch:
    """Two groups of G; 'The answer is \\boxed{7}.' for correct rollouts, \\boxed{5} else."""
    n_groups = len(rewards) // G
    rows = [PromptRow(problem=f"What is {g} + 7?", answer="7") for g in range(n_groups)]
    texts = [
        " 7. The answer is \\boxed{7}." if r else " 5. The answer is \\boxed{5}." for r in rewards
    ]
    responses = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    prompts = [tok(r.problem, add_special_tokens=False)["input_ids"] for r in rows]
    b = Batch(rows, prompts, responses, texts, [[0.0] * len(r) for r in responses],
              ["stop"] * len(texts))  # fmt: skip
    b.rewards = torch.tensor(rewards)
    return b


# half of the rollouts wrong; every group has >= 2 correct ones (every rollout has a peer)
HALF = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]


def test_rlrt_teacher_forward_only_on_correct_rollouts(tok) -> None:
    run = _run(tok, "rlrt", "teacher.probe_rows=0")
    b = _batch(tok, HALF)
    steps._build_views(run, b, step=1)
    seen = [p is not None for p in b.teacher_prefixes]
    assert seen == [r == 1.0 for r in HALF]  # today: every rollout with a peer (all 8)
    assert b.has_teacher.tolist() == seen
    assert not b.teacher_probe.any()


def test_srpo_teacher_forward_only_on_wrong_rollouts(tok) -> None:
    run = _run(tok, "srpo", "teacher.probe_rows=0")
    b = _batch(tok, HALF)
    steps._build_views(run, b, step=1)
    assert [p is not None for p in b.teacher_prefixes] == [r == 0.0 for r in HALF]


def test_probe_rows_add_unused_rows_for_the_diagnostics_only(tok) -> None:
    run = _run(tok, "rlrt", "teacher.probe_rows=2")
    b = _batch(tok, HALF)
    steps._build_views(run, b, step=1)
    assert b.has_teacher.tolist() == [r == 1.0 for r in HALF]  # what the algorithm uses
    probe = b.teacher_probe.tolist()
    assert sum(probe) == 2 and all(HALF[i] == 0.0 for i, p in enumerate(probe) if p)
    assert [p is not None for p in b.teacher_prefixes] == [
        h or p for h, p in zip(b.has_teacher.tolist(), probe, strict=True)
    ]


def test_teacher_prompts_are_capped(tok) -> None:
    run = _run(tok, "sdpo")
    b = _batch(tok, HALF)
    steps._build_views(run, b, step=1)
    longest = max(len(p) for p in b.teacher_prefixes if p is not None)
    run = _run(tok, "sdpo", f"data.max_teacher_prompt_tokens={longest - 1}")
    b = _batch(tok, HALF)
    steps._build_views(run, b, step=1)
    assert all(p is None for p in b.teacher_prefixes)  # today: the cap is never passed
    assert not b.has_teacher.any()
    assert teacher.teacher_prefix_cap(run.cfg) == longest - 1


def test_teacher_metrics_split_correct_and_wrong() -> None:
    b = SimpleNamespace(
        mask=torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.float32),
        student_logprobs=torch.zeros(4, 3),
        teacher_logprobs=torch.tensor(
            [[0.5, 0.1, 9.0], [-1.0, -2.0, -3.0], [7.0, 0.0, 0.0], [-0.5, 0.5, 0.0]]
        ),
        has_teacher=torch.tensor([True, False, False, True]),
        teacher_probe=torch.tensor([False, True, False, False]),
    )
    m = teacher.teacher_metrics(b, torch.tensor([True, False, True, False]))
    # used rows 0 and 3: tokens 0.5, 0.1, -0.5, 0.5
    assert m["delta/mean"] == pytest.approx(0.15)
    assert m["delta/abs_mean"] == pytest.approx(0.4)
    assert m["delta/std"] == pytest.approx(torch.tensor([0.5, 0.1, -0.5, 0.5]).std().item())
    # correct rows seen: 0 (row 2 has no teacher); wrong rows seen: 1 (probe) and 3
    assert m["delta/correct_mean"] == pytest.approx(0.3)
    assert m["delta/wrong_mean"] == pytest.approx((-6.0 + 0.0) / 5)
    assert m["delta/gap"] == pytest.approx(0.3 + 1.2)


def test_warning_when_the_teacher_does_not_separate(tok) -> None:
    run = _run(tok, "rlrt", "teacher.warn_gap=0.1", "teacher.warn_steps=3")
    said: list[str] = []
    run.logger = SimpleNamespace(message=said.append)
    for gap in (0.05, 0.0, 0.2, 0.0, 0.01, -0.3, 0.0):
        teacher.check_teacher(run, {"delta/gap": gap})
    assert len(said) == 1 and "does not separate" in said[0] and "teacher.warn_gap" in said[0]
    teacher.check_teacher(run, {})  # algorithms without a teacher: nothing
    assert len(said) == 1
