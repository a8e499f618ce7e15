"""Policy-gradient algorithms: GRPO, DAPO and the token-reweighted RLRT and RLSD (a PPO-clip loss
on group advantages; RLRT/RLSD reshape the advantage per token with the teacher's Delta)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._checks import (
    f32,
)
from .advantages import (
    CORRECT_THRESHOLD,
    group_advantages,
    lambda_schedule,
    rlrt_advantages,
    rlsd_advantages,
)
from .base import (
    AlgoBatch,
    Algorithm,
    Prepared,
    _check_batch,
    _has_teacher,
    _step_metrics,
    _student,
)
from .configs import (
    DAPOConfig,
    GRPOConfig,
    RLRTConfig,
    RLSDConfig,
)
from .diagnostics import asymmetry_stats
from .losses import (
    aggregate,
    pg_metrics,
    ppo_token_losses,
)


class GRPO(Algorithm):
    """Group advantages, PPO-clip loss (``A_it = A_i m_it``)."""

    name = "grpo"
    config_cls = GRPOConfig

    def _token_advantages(self, batch: AlgoBatch, adv: Tensor, valid: Tensor) -> Tensor:
        return adv[:, None] * valid.to(torch.float32)

    def prepare(self, batch: AlgoBatch) -> Prepared:
        batch, valid = _check_batch(batch, self.name, self.needs_teacher)
        adv = group_advantages(batch.rewards, batch.group_size, self.cfg.scale_by_std)
        token_adv = self._token_advantages(batch, adv, valid)
        metrics = _step_metrics(batch, adv, token_adv, valid)
        metrics.update(self._extra_metrics(batch, valid))
        correction, mismatch = self._correction(batch, valid)
        metrics.update(mismatch)
        return Prepared(
            advantages=token_adv,
            mask=valid,
            old_logprobs=f32(batch.old_logprobs.detach()),
            loss_mask=valid,
            distill=torch.zeros(valid.shape[0], dtype=torch.bool, device=valid.device),
            correction_weights=correction,
            metrics=metrics,
        )

    def _extra_metrics(self, batch: AlgoBatch, valid: Tensor) -> dict[str, float]:
        return {}

    def loss(
        self,
        logprobs: Tensor,
        prepared: Prepared,
        num_tokens: float | Tensor | None = None,
        topk: Any = None,
        *,
        num_seqs: float | Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """``policy_loss(logprobs, old_logprobs, advantages, mask)`` with this config, each
        token's term times its rollout-correction weight (when there is one)."""
        if num_tokens is None or num_seqs is None:
            nt, ns = prepared.normalizers()
            num_tokens = nt if num_tokens is None else num_tokens
            num_seqs = ns if num_seqs is None else num_seqs
        token_losses, info = ppo_token_losses(
            logprobs,
            prepared.old_logprobs,
            prepared.advantages,
            prepared.mask,
            self.cfg.eps_low,
            self.cfg.eps_high,
            self.cfg.dual_clip,
        )
        token_losses = _corrected(token_losses, prepared.correction_weights)
        loss = aggregate(token_losses, prepared.mask, self.cfg.agg, num_tokens, num_seqs)
        return loss, pg_metrics(info, prepared.mask)


class DAPO(GRPO):
    """GRPO with clip-higher, token-mean and dynamic sampling."""

    name = "dapo"
    config_cls = DAPOConfig

    def __init__(self, cfg: Any = None, **overrides: Any) -> None:
        super().__init__(cfg, **overrides)
        self.dynamic_sampling = bool(self.cfg.dynamic_sampling)


def _corrected(x: Tensor, weights: Tensor | None) -> Tensor:
    """``x * weights`` (the rollout correction of a per-token term); ``x`` itself when None."""
    return x if weights is None else x * weights


def _teacher_where(batch: AlgoBatch, rows: Tensor) -> Tensor:
    """Teacher log-probs on ``rows``, the student's elsewhere (Delta = 0, weight 1), so rows the
    algorithm does not use may hold anything (zeros, NaN) in ``teacher_logprobs``."""
    student = _student(batch)
    return torch.where(
        rows[:, None], batch.teacher_logprobs, student.to(batch.teacher_logprobs.dtype)
    )


def _finite_rows(x: Tensor, valid: Tensor) -> Tensor:
    return (torch.isfinite(x) | ~valid).all(dim=1)


class RLRT(GRPO):
    """RLRT: ``Ahat = rlrt_advantages(A, r, s, tau, m, alpha, eps_w, has_teacher)``, PPO loss."""

    name = "rlrt"
    config_cls = RLRTConfig
    needs_teacher = True
    teacher_context = "peer"
    teacher_weights = "current"

    def teacher_rows(self, rewards: Tensor, has_context: Tensor | None = None) -> Tensor:
        """Correct rollouts with a context (all rows with a context for RLRT-all)."""
        rows = super().teacher_rows(rewards, has_context)
        if self.cfg.reward_gate:
            rows = rows & (f32(rewards.detach()) > CORRECT_THRESHOLD)
        return rows

    def _token_advantages(self, batch: AlgoBatch, adv: Tensor, valid: Tensor) -> Tensor:
        rows = self.teacher_rows(batch.rewards, batch.has_teacher)
        return rlrt_advantages(
            adv,
            batch.rewards,
            _student(batch),
            _teacher_where(batch, rows),
            batch.mask,
            self.cfg.alpha,
            self.cfg.eps_w,
            rows,
            self.cfg.reward_gate,
        )

    def _extra_metrics(self, batch: AlgoBatch, valid: Tensor) -> dict[str, float]:
        # every row with a context and finite teacher log-probs: incorrect rollouts too when the
        # trainer computed them (the correct / incorrect asymmetry is the paper's diagnostic)
        rows = _has_teacher(batch) & _finite_rows(batch.teacher_logprobs, valid)
        student = _student(batch)
        stats = asymmetry_stats(
            student[rows],
            batch.teacher_logprobs[rows],
            valid[rows],
            batch.rewards[rows],
            self.cfg.eps_w,
        )
        out = {f"asym/{k}": v for k, v in stats.items()}
        out["frac_rows_with_teacher"] = float(rows.float().mean())
        return out


class RLSD(RLRT):
    """RLSD: ``Ahat = rlsd_advantages(A, s, tau, m, eps_w, lam(step))``, PPO loss."""

    name = "rlsd"
    config_cls = RLSDConfig
    needs_teacher = True
    teacher_context = "reference"
    teacher_weights = "snapshot"

    def __init__(self, cfg: Any = None, **overrides: Any) -> None:
        super().__init__(cfg, **overrides)
        self.teacher_refresh_every = int(self.cfg.teacher_refresh_every)

    def teacher_rows(self, rewards: Tensor, has_context: Tensor | None = None) -> Tensor:
        """Every row with a context (RLSD reshapes correct and incorrect rollouts)."""
        return Algorithm.teacher_rows(self, rewards, has_context)

    def lam(self, step: int) -> float:
        return lambda_schedule(step, self.cfg.lam_init, self.cfg.lam_decay_steps)

    def _token_advantages(self, batch: AlgoBatch, adv: Tensor, valid: Tensor) -> Tensor:
        rows = self.teacher_rows(batch.rewards, batch.has_teacher)
        return rlsd_advantages(
            adv,
            _student(batch),
            _teacher_where(batch, rows),
            batch.mask,
            self.cfg.eps_w,
            self.lam(batch.step),
            rows,
        )

    def _extra_metrics(self, batch: AlgoBatch, valid: Tensor) -> dict[str, float]:
        out = super()._extra_metrics(batch, valid)
        out["lam"] = self.lam(batch.step)
        return out
