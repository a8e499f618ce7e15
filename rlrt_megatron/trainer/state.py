"""What the loop's phases share: `Run` (the state kept from step to step) and `Batch` (one step's
rollouts and everything computed on them), plus the helper that puts ragged per-rollout lists on
the policy's device (built there once, never moved per micro-batch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rlrt_megatron.config import TrainConfig
from rlrt_megatron.trainer.checkpoint import Checkpointer
from rlrt_megatron.trainer.metrics import MetricsLogger
from rlrt_megatron.trainer.watchdog import Watchdog

# The checkpoint file holding the asynchronous rollout queue (`trainer/rollouts.py`).
ROLLOUT_QUEUE_FILE = "rollout_queue.pt"


@dataclass
class Run:
    """Everything the loop carries from step to step."""

    cfg: TrainConfig
    rank: int
    world_size: int
    policy: Any
    algo: Any
    tokenizer: Any
    dataset: Any
    sampler: Any
    prompt_template: Any
    engine: Any
    reward_fn: Any
    checkpointer: Checkpointer
    logger: MetricsLogger
    watchdog: Watchdog
    pad_id: int
    teacher: list | None = None
    step: int = 0
    rollout_version: int = 0
    rollouts: Any = None  # trainer.rollouts.RolloutQueue with rollout.max_staleness >= 1
    extra: dict = field(default_factory=dict)


@dataclass
class Batch:
    """One step's rollouts, group-major: row `g * G + j` is the j-th rollout of prompt g."""

    rows: list[Any]  # PromptRow per group
    prompts: list[list[int]]  # prompt ids per group
    responses: list[list[int]]  # per rollout
    texts: list[str]
    behavior_logprobs: list[list[float]]
    finish: list[str]
    versions: list[int] = field(default_factory=list)  # the engine's weights version per rollout
    token_versions: list = field(default_factory=list)  # per rollout, the version of each token
    rewards: torch.Tensor | None = None
    reward_info: dict = field(default_factory=dict)
    row_prompts: list = field(default_factory=list)  # prompt ids per rollout
    row_responses: list = field(default_factory=list)  # response ids per rollout (never empty)
    teacher_prefixes: list = field(default_factory=list)  # teacher context + prompt, or None
    has_teacher: torch.Tensor | None = None  # [B] bool: rows whose teacher the algorithm uses
    teacher_used: list = field(default_factory=list)  # has_teacher as a host list
    teacher_probe: torch.Tensor | None = None  # [B] bool: teacher seen for diagnostics only
    width: int = 0
    mask: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    student_logprobs: torch.Tensor | None = None
    teacher_logprobs: torch.Tensor | None = None
    teacher_entropy: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    behavior: torch.Tensor | None = None  # [B, T] the engine's log-probs, padded
    topk_ids: torch.Tensor | None = None  # [B, T, K] the pre-update student's top-k support
    teacher_topk_logprobs: torch.Tensor | None = None  # [B, T, K+1] teacher on that support
    sync_metrics: dict = field(default_factory=dict)  # staleness and the sync check
    routed: list | None = None  # MoE routing replay: the engine's experts per rollout


def ragged_to_padded(rows: list[list[float]], width: int, dev: torch.device) -> torch.Tensor:
    """`[n, width]` fp32 on `dev` from ragged rows (zeros on the right): one host-to-device
    copy of the whole batch, not one per row."""
    out = torch.zeros(len(rows), width, dtype=torch.float32)
    for i, r in enumerate(rows):
        if r:
            k = min(len(r), width)
            out[i, :k] = torch.tensor(r[:k], dtype=torch.float32)
    return out.to(dev, non_blocking=True)
