"""The algorithm interface (see `registry.py` for the contract): the batch types (`AlgoBatch`,
`Prepared`, `TopK`), shared checks and metrics, and the `Algorithm` base class."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from ._checks import (
    as_tensor,
    check_finite_where,
    check_ndim,
    check_rows,
    check_same_shape,
    f32,
    mask_bool,
)
from .advantages import (
    CORRECT_THRESHOLD,
)
from .configs import (
    PPOConfig,
)
from .correction import RolloutCorrectionConfig, rollout_correction

# ----------------------------------------------------------------------------- batch types


@dataclass
class AlgoBatch:
    """One training step's rollouts, padded [B, T] over response tokens (group-contiguous rows).

    Attributes:
        rewards: [B].
        group_size: G, B % G == 0.
        mask: [B, T] 0/1 (or bool) response-token mask.
        old_logprobs: [B, T] behaviour/old-policy log-probs of the sampled tokens (PPO ratio).
        student_logprobs: [B, T] the policy before the update, no grad; None = old_logprobs.
        teacher_logprobs: [B, T] no grad; needed when ``needs_teacher`` and not ``needs_topk``.
        has_teacher: [B] bool: the row has a teacher context; None = all rows.
        teacher_entropy: [B, T] optional teacher entropy (SRPO normalises its weights
            step-wide when given here, otherwise per micro-batch from ``TopK.teacher_entropy``).
        step: the training step (schedules).
        rollout_logprobs: [B, T] the rollout engine's log-probs of the sampled tokens; with it
            ``prepare`` computes the rollout-correction weights against the trainer's
            ``student_logprobs`` (:func:`~.correction.rollout_correction`) and the
            ``mismatch/*`` metrics. None = no correction, no mismatch metrics.
    """

    rewards: Tensor
    group_size: int
    mask: Tensor
    old_logprobs: Tensor
    student_logprobs: Tensor | None = None
    teacher_logprobs: Tensor | None = None
    has_teacher: Tensor | None = None
    teacher_entropy: Tensor | None = None
    step: int = 0
    rollout_logprobs: Tensor | None = None


class TopK(NamedTuple):
    """Top-k distributions for one micro-batch, at the student's top-k ids plus a tail bucket."""

    student_topk_logprobs: Tensor  # [b, T, K+1], with grad
    teacher_topk_logprobs: Tensor  # [b, T, K+1]
    teacher_entropy: Tensor | None = None  # [b, T] teacher entropy (full vocab or K+1 support)


@dataclass
class Prepared:
    """What ``prepare`` computed for a step; row-sliceable with :meth:`select`.

    Attributes:
        advantages: [B, T] fp32 token advantages (0 at masked positions and distilled rows).
        mask: [B, T] bool response mask.
        old_logprobs: [B, T] fp32.
        loss_mask: [B, T] bool, the tokens that count in the loss denominator.
        distill: [B] bool, rows whose loss is the distillation term (SDPO, SRPO).
        teacher_logprobs: [B, T] fp32 or None (SDPO sampled-token variant).
        token_weights: [B, T] fp32 or None (SRPO entropy weights normalised step-wide).
        correction_weights: [B, T] fp32 or None: the rollout-correction weight of each token,
            multiplied into its loss term by every algorithm; None (mode "none") leaves the loss
            untouched.
        metrics: step metrics (python floats), not sliced.
    """

    advantages: Tensor
    mask: Tensor
    old_logprobs: Tensor
    loss_mask: Tensor
    distill: Tensor
    teacher_logprobs: Tensor | None = None
    token_weights: Tensor | None = None
    correction_weights: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return int(self.mask.shape[0])

    def select(self, idx: Tensor | slice | list[int]) -> Prepared:
        """Rows ``idx`` (index tensor, list or slice) of every tensor field; metrics shared."""
        if isinstance(idx, list):
            idx = torch.tensor(idx, dtype=torch.long, device=self.mask.device)
        changes = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                changes[f.name] = v[idx]
        return dataclasses.replace(self, **changes)

    def normalizers(self) -> tuple[float, float]:
        """``(num_tokens, num_seqs)`` of these rows: loss-mask tokens and rows with >= 1 of them.
        Call on the mini-batch slice and pass to every micro-batch's ``loss``."""
        per_row = self.loss_mask.sum(dim=1)
        return float(per_row.sum()), float((per_row > 0).sum())


# ----------------------------------------------------------------------------- algorithms


def _check_batch(batch: AlgoBatch, name: str, need_teacher: bool) -> tuple[AlgoBatch, Tensor]:
    """Validate ``batch``; return it with the per-row tensors on the mask's device, and the
    bool mask."""
    fn = f"{name}.prepare"
    mask = as_tensor(fn, "mask", batch.mask)
    check_ndim(fn, "mask", mask, 2)
    check_rows(fn, "rewards", as_tensor(fn, "rewards", batch.rewards), "mask", mask)
    check_same_shape(
        fn, "old_logprobs", as_tensor(fn, "old_logprobs", batch.old_logprobs), "mask", mask
    )
    valid = mask_bool(fn, mask)
    check_finite_where(fn, "old_logprobs", batch.old_logprobs, valid)
    for attr in ("student_logprobs", "teacher_logprobs", "teacher_entropy"):
        x = getattr(batch, attr)
        if x is not None:
            check_same_shape(fn, attr, as_tensor(fn, attr, x), "mask", mask)
    if batch.has_teacher is not None:
        check_rows(fn, "has_teacher", as_tensor(fn, "has_teacher", batch.has_teacher), "mask", mask)
    if need_teacher and batch.teacher_logprobs is None:
        raise ValueError(f"{fn}: `teacher_logprobs` [B, T] is required (needs_teacher=True)")
    dev = mask.device
    has = None if batch.has_teacher is None else batch.has_teacher.to(dev)
    return dataclasses.replace(batch, rewards=batch.rewards.to(dev), has_teacher=has), valid


def _has_teacher(batch: AlgoBatch) -> Tensor:
    if batch.has_teacher is None:
        return torch.ones(batch.mask.shape[0], dtype=torch.bool, device=batch.mask.device)
    return batch.has_teacher.to(device=batch.mask.device, dtype=torch.bool)


def _step_metrics(batch: AlgoBatch, adv: Tensor, token_adv: Tensor, valid: Tensor) -> dict:
    r = f32(batch.rewards.detach())
    g = batch.group_size
    r_g = r.view(-1, g)
    n_tok = valid.sum().clamp(min=1)
    return {
        "reward_mean": float(r.mean()),
        "accuracy": float((r > CORRECT_THRESHOLD).float().mean()),
        "frac_groups_all_equal": float((r_g.max(1).values == r_g.min(1).values).float().mean()),
        "adv_abs_mean": float(adv.abs().mean()),
        "token_adv_mean": float(token_adv.sum() / n_tok),
        "response_len_mean": float(valid.float().sum(1).mean()),
    }


def _student(batch: AlgoBatch) -> Tensor:
    """The student's log-probs of the batch (the pre-update recompute, else the old ones)."""
    return batch.old_logprobs if batch.student_logprobs is None else batch.student_logprobs


class Algorithm:
    """Base class; subclasses set the class attributes and implement ``prepare`` / ``loss``."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type] = PPOConfig
    needs_teacher: ClassVar[bool] = False
    teacher_context: ClassVar[str | None] = None
    teacher_weights: ClassVar[str] = "current"
    dynamic_sampling: bool = False
    needs_topk: int = 0
    teacher_refresh_every: int | None = None
    ema_rate: float | None = None

    def __init__(
        self,
        cfg: Any = None,
        correction: RolloutCorrectionConfig | dict | None = None,
        **overrides: Any,
    ) -> None:
        if isinstance(correction, dict):
            correction = RolloutCorrectionConfig(**correction)
        self.correction = correction or RolloutCorrectionConfig()
        if cfg is None:
            cfg = self.config_cls(**overrides)
        elif isinstance(cfg, dict):
            cfg = self.config_cls(**{**cfg, **overrides})
        elif isinstance(cfg, self.config_cls):
            cfg = dataclasses.replace(cfg, **overrides) if overrides else cfg
        else:
            raise ValueError(
                f"{type(self).__name__}: cfg must be None, a dict or {self.config_cls.__name__}, "
                f"got {type(cfg).__name__}"
            )
        self.cfg = cfg

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cfg}, correction={self.correction})"

    def _correction(self, batch: AlgoBatch, valid: Tensor) -> tuple[Tensor | None, dict]:
        """(rollout-correction weights or None, ``mismatch/*`` metrics) of a checked batch:
        the trainer's pre-update log-probs against the engine's. Mode "none" still measures
        the mismatch but returns no weights, so the loss stays bit-identical."""
        if batch.rollout_logprobs is None:
            return None, {}
        c = self.correction
        weights, metrics = rollout_correction(
            _student(batch), batch.rollout_logprobs, valid, c.mode, c.cap, c.low, c.level
        )
        return (None if c.mode == "none" else weights), metrics

    def teacher_rows(self, rewards: Tensor, has_context: Tensor | None = None) -> Tensor:
        """[B] bool: the rows whose teacher log-probs this algorithm uses, given the rewards and
        which rows have a teacher context (None = all). The trainer may run the teacher forward
        on these rows only and pass ``AlgoBatch.has_teacher = teacher_rows(...)``; the
        ``teacher_logprobs`` of other rows are then ignored (they may hold anything)."""
        rows = torch.full(
            rewards.shape, self.needs_teacher, dtype=torch.bool, device=rewards.device
        )
        if has_context is not None:
            rows = rows & has_context.to(device=rewards.device, dtype=torch.bool)
        return rows

    def prepare(self, batch: AlgoBatch) -> Prepared:
        """Once per step: token advantages, routing and step metrics (no grad anywhere)."""
        raise NotImplementedError

    def loss(
        self,
        logprobs: Tensor,
        prepared: Prepared,
        num_tokens: float | Tensor | None = None,
        topk: Any = None,
        *,
        num_seqs: float | Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Per micro-batch: ``logprobs`` [b, T] of the sampled tokens with grad, ``prepared``
        sliced to the same b rows, mini-batch normalisers (see the module docstring), ``topk``
        when ``needs_topk``. Returns (scalar fp32 loss to backpropagate, metrics as detached
        0-d tensors: no host sync per micro-batch, the trainer reads them once per mini-batch)."""
        raise NotImplementedError
