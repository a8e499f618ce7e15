"""Self-distillation algorithms: SDPO (distillation on the student's top-k support towards an EMA
teacher given a peer solution) and SRPO (SDPO on incorrect rollouts with a teacher, GRPO on the
rest)."""

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
)
from .base import AlgoBatch, Algorithm, Prepared, TopK, _check_batch, _has_teacher, _step_metrics
from .configs import (
    SDPOConfig,
    SRPOConfig,
)
from .losses import (
    aggregate,
    clipped_is_weights,
    pg_metrics,
    ppo_token_losses,
    sampled_token_distillation_loss,
    self_distillation_loss,
)
from .pg import _corrected, _teacher_where


def _as_topk(name: str, topk: Any) -> TopK:
    """Accept a :class:`TopK`, any object with ``student_logprobs`` / ``teacher_logprobs`` /
    ``teacher_entropy`` attributes (``megatron.logprobs.TopKLogprobs``), or a 2/3-tuple
    ``(student_topk_logprobs, teacher_topk_logprobs[, teacher_entropy])``."""
    if topk is None:
        raise ValueError(
            f"{name}.loss: `topk` (student_topk_logprobs [b,T,K+1], teacher_topk_logprobs "
            "[b,T,K+1], teacher_entropy [b,T] | None) is required (needs_topk > 0)"
        )
    if isinstance(topk, TopK):
        return topk
    if hasattr(topk, "student_logprobs") and hasattr(topk, "teacher_logprobs"):
        return TopK(
            topk.student_logprobs, topk.teacher_logprobs, getattr(topk, "teacher_entropy", None)
        )
    if isinstance(topk, tuple) and len(topk) in (2, 3):
        return TopK(*topk)
    raise ValueError(
        f"{name}.loss: `topk` must be a TopK, an object with student_logprobs/teacher_logprobs "
        f"attributes or a 2/3-tuple, got {type(topk).__name__}"
    )


class SDPO(Algorithm):
    """SDPO: distillation loss on rows with a teacher context, nothing on the others.

    ``L = sum_{i: has_teacher_i} sum_t m_it c_it JSD_beta(S_it, T_it) / N_tok`` with
    ``c_it = min(pi / pi_old, is_clip)`` and N_tok the tokens of the distilled rows (SDPO's
    reference token-mean). The ``"sampled"`` variant uses ``c_it sg(s - tau) s`` instead.
    """

    name = "sdpo"
    config_cls = SDPOConfig
    needs_teacher = True
    teacher_context = "peer"
    teacher_weights = "ema"

    def __init__(self, cfg: Any = None, **overrides: Any) -> None:
        super().__init__(cfg, **overrides)
        self.needs_topk = int(self.cfg.topk) if self.cfg.variant == "topk" else 0
        self.ema_rate = float(self.cfg.ema_rate)

    def prepare(self, batch: AlgoBatch) -> Prepared:
        sampled = self.cfg.variant == "sampled"
        batch, valid = _check_batch(batch, self.name, need_teacher=sampled)
        # validates rewards / group_size even though SDPO uses no advantage
        adv = group_advantages(batch.rewards, batch.group_size)
        distill = _has_teacher(batch)
        zeros = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
        teacher = None
        if sampled:
            teacher = f32(_teacher_where(batch, distill).detach())
        metrics = _step_metrics(batch, adv, zeros, valid)
        metrics["frac_rows_distilled"] = float(distill.float().mean())
        correction, mismatch = self._correction(batch, valid)
        metrics.update(mismatch)
        return Prepared(
            advantages=zeros,
            mask=valid,
            old_logprobs=f32(batch.old_logprobs.detach()),
            loss_mask=valid & distill[:, None],
            distill=distill,
            teacher_logprobs=teacher,
            correction_weights=correction,
            metrics=metrics,
        )

    def loss(
        self,
        logprobs: Tensor,
        prepared: Prepared,
        num_tokens: float | Tensor | None = None,
        topk: Any = None,
        *,
        num_seqs: float | Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        if num_tokens is None:
            num_tokens = prepared.normalizers()[0]
        c = clipped_is_weights(logprobs, prepared.old_logprobs, prepared.mask, self.cfg.is_clip)
        c = _corrected(c, prepared.correction_weights)
        if self.cfg.variant == "sampled":
            return sampled_token_distillation_loss(
                logprobs, prepared.teacher_logprobs, prepared.loss_mask, c, num_tokens=num_tokens
            )
        tk = _as_topk(self.name, topk)
        return self_distillation_loss(
            tk.student_topk_logprobs,
            tk.teacher_topk_logprobs,
            prepared.loss_mask,
            self.cfg.beta,
            c,
            num_tokens=num_tokens,
        )


def entropy_weights(teacher_entropy: Tensor, sel: Tensor, entropy_beta: float) -> Tensor:
    """SRPO token weights ``w_t = exp(-beta_H H_t) / mean_{sel} exp(-beta_H H_t)`` on ``sel``
    ([B, T] bool), 0 elsewhere (mean 1 over the selected tokens)."""
    h = torch.where(sel, f32(teacher_entropy.detach()), torch.zeros((), device=sel.device))
    w = torch.exp(-entropy_beta * h) * sel.to(torch.float32)
    mean = w.sum() / sel.sum().clamp(min=1)
    # nothing selected: w is all zeros, returned as is (a where, not a host-side branch: no sync)
    return w / torch.where(mean > 0, mean, torch.ones_like(mean))


class SRPO(Algorithm):
    """SRPO: ``z_i = (1 - correct_i) has_teacher_i``; z = 1 rows take the entropy-weighted SDPO
    term, the others the PPO term, over one shared token-mean denominator::

        L = [ sum_{z_i=0} sum_t m_it l^PPO_it + sum_{z_i=1} sum_t m_it w_it c_it JSD_beta ] / N_tok
    """

    name = "srpo"
    config_cls = SRPOConfig
    needs_teacher = True
    teacher_context = "peer"
    teacher_weights = "ema"

    def __init__(self, cfg: Any = None, **overrides: Any) -> None:
        super().__init__(cfg, **overrides)
        self.needs_topk = int(self.cfg.topk)
        self.ema_rate = float(self.cfg.ema_rate)

    def teacher_rows(self, rewards: Tensor, has_context: Tensor | None = None) -> Tensor:
        """Incorrect rollouts with a context (the rows routed to the SDPO term)."""
        rows = super().teacher_rows(rewards, has_context)
        return rows & ~(f32(rewards.detach()) > CORRECT_THRESHOLD)

    def prepare(self, batch: AlgoBatch) -> Prepared:
        batch, valid = _check_batch(batch, self.name, need_teacher=False)
        adv = group_advantages(batch.rewards, batch.group_size, self.cfg.scale_by_std)
        correct = f32(batch.rewards.detach()).to(valid.device) > CORRECT_THRESHOLD
        distill = ~correct & _has_teacher(batch)
        token_adv = adv[:, None] * (valid & ~distill[:, None]).to(torch.float32)
        weights = None
        if batch.teacher_entropy is not None:
            weights = entropy_weights(
                batch.teacher_entropy, valid & distill[:, None], self.cfg.entropy_beta
            )
        metrics = _step_metrics(batch, adv, token_adv, valid)
        metrics["frac_rows_distilled"] = float(distill.float().mean())
        correction, mismatch = self._correction(batch, valid)
        metrics.update(mismatch)
        return Prepared(
            advantages=token_adv,
            mask=valid,
            old_logprobs=f32(batch.old_logprobs.detach()),
            loss_mask=valid,
            distill=distill,
            token_weights=weights,
            correction_weights=correction,
            metrics=metrics,
        )

    def loss(
        self,
        logprobs: Tensor,
        prepared: Prepared,
        num_tokens: float | Tensor | None = None,
        topk: Any = None,
        *,
        num_seqs: float | Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        if num_tokens is None:
            num_tokens = prepared.normalizers()[0]
        pg_mask = prepared.mask & ~prepared.distill[:, None]
        sd_mask = prepared.mask & prepared.distill[:, None]
        pg_losses, info = ppo_token_losses(
            logprobs,
            prepared.old_logprobs,
            prepared.advantages,
            pg_mask,
            self.cfg.eps_low,
            self.cfg.eps_high,
            self.cfg.dual_clip,
        )
        pg_losses = _corrected(pg_losses, prepared.correction_weights)
        # Both terms are sums over their own tokens divided by the same N_tok.
        loss = aggregate(pg_losses, pg_mask, "token-mean", num_tokens)
        metrics = {f"pg_{k}": v for k, v in pg_metrics(info, pg_mask).items()}
        if topk is None and bool(sd_mask.any()):  # the only host sync, never on the trainer's path
            _as_topk(self.name, topk)  # raises: distilled rows need the top-k
        if topk is not None:  # always with top-k (a term of 0 without distilled rows): no sync
            tk = _as_topk(self.name, topk)
            if prepared.token_weights is not None:
                w = prepared.token_weights
            elif tk.teacher_entropy is not None:
                w = entropy_weights(tk.teacher_entropy, sd_mask, self.cfg.entropy_beta)
            else:
                raise ValueError(
                    "srpo.loss: teacher entropy is required for the SDPO branch: give "
                    "AlgoBatch.teacher_entropy [B, T] or TopK.teacher_entropy [b, T]"
                )
            c = clipped_is_weights(logprobs, prepared.old_logprobs, sd_mask, self.cfg.is_clip)
            c = _corrected(c, prepared.correction_weights)
            sd_loss, sd_metrics = self_distillation_loss(
                tk.student_topk_logprobs,
                tk.teacher_topk_logprobs,
                sd_mask,
                self.cfg.beta,
                c,
                num_tokens=num_tokens,
                token_weights=w,
            )
            loss = loss + sd_loss
            metrics.update({f"sd_{k}": v for k, v in sd_metrics.items()})
        return loss, metrics
