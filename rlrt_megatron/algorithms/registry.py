"""Algorithm objects: one interface for GRPO, DAPO, RLRT, RLSD, SDPO and SRPO.

The trainer has no per-algorithm branches. Per step it builds an :class:`AlgoBatch` and calls
``prepared = algo.prepare(batch)`` once; per micro-batch (rows ``idx``) it calls
``loss, metrics = algo.loss(logprobs, prepared.select(idx), num_tokens, topk=...)``. The class
attributes tell it what to compute beforehand:

- ``needs_teacher``: compute teacher log-probs (``teacher_logprobs`` in the batch, or the
  teacher top-k during the update when ``needs_topk``), on ``teacher_context`` with
  ``teacher_weights``;
- ``teacher_context``: ``"peer"`` (another correct rollout of the group, SDPO's reprompt
  template; rows without one get ``has_teacher = False``), ``"reference"`` (the dataset's
  reference solution) or ``None``;
- ``teacher_weights``: ``"current"`` (the policy itself), ``"snapshot"`` (a copy refreshed every
  ``teacher_refresh_every`` steps) or ``"ema"`` (``theta_T <- (1 - ema_rate) theta_T +
  ema_rate theta``);
- ``needs_topk``: 0, or k: during the update pass ``topk = TopK(student_topk_logprobs [b,T,K+1]
  with grad, teacher_topk_logprobs [b,T,K+1], teacher_entropy [b,T] or None)`` at the *student's*
  top-k ids with the tail bucket appended (:func:`~.losses.append_tail_bucket`);
- ``dynamic_sampling``: drop groups whose rewards are all equal
  (:func:`~.advantages.dapo_keep_mask`) before ``prepare``;
- ``teacher_rows(rewards, has_context)``: the rows whose teacher log-probs are used (RLRT: correct
  rollouts with a peer; SRPO: incorrect ones); the teacher forward may skip the others.
- ``teacher_refresh_every`` (RLSD snapshot) and ``ema_rate`` (SDPO/SRPO EMA teacher): None when
  not applicable.

Rollout correction (:mod:`.correction`): every algorithm takes ``correction`` (the
``algorithm.rollout_correction`` settings); when ``AlgoBatch.rollout_logprobs`` (the engine's
log-probs) is given, ``prepare`` computes ``rollout_correction(student_logprobs,
rollout_logprobs, mask, ...)`` once per step and every ``loss`` multiplies each token's term (the
PPO term; the distillation term of SDPO/SRPO) by its weight. Mode ``none`` measures the mismatch
but leaves the loss bit-identical.

Normalisation: ``loss`` returns ``sum(per-token loss over the micro-batch) / num_tokens`` (token
mean) or ``sum(per-sequence loss) / num_seqs`` (seq-mean aggregations), so summing micro-batch
losses gives the mini-batch loss. Pass ``num_tokens, num_seqs = prepared.select(minibatch_rows)
.normalizers()`` (SDPO counts only the rows it distils); with data parallelism, sum them over
ranks and divide by the DP size (DDP averages gradients). Left as None they default to the
micro-batch's own counts (right when micro-batch == mini-batch).
"""

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
    group_advantages,
    lambda_schedule,
    rlrt_advantages,
    rlsd_advantages,
)
from .correction import RolloutCorrectionConfig, rollout_correction
from .diagnostics import asymmetry_stats
from .losses import (
    AGG_MODES,
    aggregate,
    clipped_is_weights,
    pg_metrics,
    ppo_token_losses,
    sampled_token_distillation_loss,
    self_distillation_loss,
)

# ----------------------------------------------------------------------------- configs


@dataclass
class PPOConfig:
    """Policy-loss settings shared by the PPO-style algorithms.

    Attributes:
        eps_low: lower clip, ratio >= 1 - eps_low (0.2).
        eps_high: upper clip, ratio <= 1 + eps_high (0.28 = DAPO clip-higher).
        agg: "token-mean" (DAPO) | "seq-mean-token-mean" (GRPO) | "seq-mean-token-sum".
        dual_clip: c > 1 for dual-clip on A < 0 (3.0 in the literature), None = off.
        scale_by_std: GRPO's division by the group std; False = Dr.GRPO.
    """

    eps_low: float = 0.2
    eps_high: float = 0.28
    agg: str = "token-mean"
    dual_clip: float | None = None
    scale_by_std: bool = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.agg not in AGG_MODES:
            raise ValueError(f"{name}.agg must be one of {AGG_MODES}, got {self.agg!r}")
        if not (0.0 <= self.eps_low < 1.0) or self.eps_high < 0.0:
            raise ValueError(
                f"{name}: need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={self.eps_low}, "
                f"eps_high={self.eps_high}"
            )
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"{name}.dual_clip must be > 1 or None, got {self.dual_clip}")


@dataclass
class GRPOConfig(PPOConfig):
    """GRPO: symmetric clip 0.2 and seq-mean-token-mean aggregation."""

    eps_high: float = 0.2
    agg: str = "seq-mean-token-mean"


@dataclass
class DAPOConfig(PPOConfig):
    """DAPO: clip-higher (0.2 / 0.28), token-mean, dynamic sampling.

    Attributes:
        dynamic_sampling: drop groups with identical rewards (trainer, via dapo_keep_mask).
    """

    dynamic_sampling: bool = True


@dataclass
class RLRTConfig(PPOConfig):
    """RLRT: DAPO's policy loss with reversed-teacher token advantages on correct rollouts.

    Attributes:
        alpha: interpolation, 0 = GRPO exactly, 1 = full reverse weighting (1.0).
        eps_w: clip of the token weight, w in [1 - eps_w, 1 + eps_w] (0.2).
        reward_gate: reshape only correct rollouts (True); False = the "RLRT-all" ablation.
    """

    alpha: float = 1.0
    eps_w: float = 0.2
    reward_gate: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"RLRTConfig.alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.eps_w < 1.0:
            raise ValueError(f"RLRTConfig.eps_w must be in [0, 1), got {self.eps_w}")


@dataclass
class RLSDConfig(PPOConfig):
    """RLSD: teacher-agreement token weights on every rollout, lambda decaying to 0.

    Attributes:
        eps_w: weight clip (0.2).
        lam_init: lambda at step 0 (0.5).
        lam_decay_steps: steps for the linear decay to 0 (50); None = constant.
        teacher_refresh_every: snapshot teacher refresh interval in steps (10).
    """

    eps_w: float = 0.2
    lam_init: float = 0.5
    lam_decay_steps: int | None = 50
    teacher_refresh_every: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.eps_w < 1.0:
            raise ValueError(f"RLSDConfig.eps_w must be in [0, 1), got {self.eps_w}")
        if self.teacher_refresh_every < 1:
            raise ValueError(
                f"RLSDConfig.teacher_refresh_every must be >= 1, got {self.teacher_refresh_every}"
            )


@dataclass
class SDPOConfig:
    """SDPO: distillation from an EMA self-teacher that sees a successful peer rollout.

    Attributes:
        beta: generalized-JSD interpolation, 0 = KL(T||S) forward, 1 = KL(S||T) reverse (0.5).
        topk: k of the student's top-k ids (+ 1 tail bucket) (100).
        ema_rate: teacher EMA rate (0.05).
        is_clip: IS weight min(pi / pi_old, is_clip) (2.0).
        variant: "topk" (generalized JSD) | "sampled" (sg(s - tau) * s on sampled tokens).
    """

    beta: float = 0.5
    topk: int = 100
    ema_rate: float = 0.05
    is_clip: float = 2.0
    variant: str = "topk"

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"{name}.beta must be in [0, 1], got {self.beta}")
        if self.topk < 1:
            raise ValueError(f"{name}.topk must be >= 1, got {self.topk}")
        if not 0.0 < self.ema_rate <= 1.0:
            raise ValueError(f"{name}.ema_rate must be in (0, 1], got {self.ema_rate}")
        if self.is_clip <= 0.0:
            raise ValueError(f"{name}.is_clip must be > 0, got {self.is_clip}")
        if self.variant not in ("topk", "sampled"):
            raise ValueError(f"{name}.variant must be 'topk' or 'sampled', got {self.variant!r}")


@dataclass
class SRPOConfig(PPOConfig):
    """SRPO: incorrect rollouts with a peer teacher -> entropy-weighted SDPO term, rest -> PPO.

    Attributes (besides the PPO ones; ``agg`` must stay "token-mean": one shared denominator):
        beta, topk, ema_rate, is_clip: as SDPOConfig.
        entropy_beta: beta_H in w_t = exp(-beta_H * H_t(teacher)), normalised to mean 1 (1.0).
    """

    beta: float = 0.5
    topk: int = 100
    ema_rate: float = 0.05
    is_clip: float = 2.0
    entropy_beta: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.agg != "token-mean":
            raise ValueError(
                f"SRPOConfig.agg must be 'token-mean' (one shared denominator), got {self.agg!r}"
            )
        SDPOConfig(beta=self.beta, topk=self.topk, ema_rate=self.ema_rate, is_clip=self.is_clip)
        if self.entropy_beta < 0.0:
            raise ValueError(f"SRPOConfig.entropy_beta must be >= 0, got {self.entropy_beta}")


@dataclass
class AlgorithmConfig:
    """The ``algorithm`` section of TrainConfig: which algorithm, and every algorithm's settings
    (dotted overrides such as ``algorithm.rlrt.alpha=0.5``)."""

    name: str = "rlrt"
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    dapo: DAPOConfig = field(default_factory=DAPOConfig)
    rlrt: RLRTConfig = field(default_factory=RLRTConfig)
    rlsd: RLSDConfig = field(default_factory=RLSDConfig)
    sdpo: SDPOConfig = field(default_factory=SDPOConfig)
    srpo: SRPOConfig = field(default_factory=SRPOConfig)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)

    def __post_init__(self) -> None:
        if self.name not in ALGORITHMS:
            raise ValueError(
                f"AlgorithmConfig.name must be one of {sorted(ALGORITHMS)}, got {self.name!r}"
            )

    def selected(self) -> Any:
        """The config of the selected algorithm."""
        return getattr(self, self.name)


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
        when ``needs_topk``. Returns (scalar fp32 loss to backpropagate, float metrics)."""
        raise NotImplementedError


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


def _student(batch: AlgoBatch) -> Tensor:
    return batch.old_logprobs if batch.student_logprobs is None else batch.student_logprobs


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
    n = sel.sum()
    if int(n) == 0:
        return w
    return w / (w.sum() / n)


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
        if bool(sd_mask.any()):
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


ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (GRPO, DAPO, RLRT, RLSD, SDPO, SRPO)
}


def get_algorithm(name: str | None = None, cfg: Any = None, **overrides: Any) -> Algorithm:
    """Build an algorithm by name from ``cfg``: None (defaults), a dict of its config fields, its
    config dataclass, or an :class:`AlgorithmConfig` (its ``name`` is used when ``name`` is None,
    its ``rollout_correction`` becomes the algorithm's ``correction``; or pass
    ``correction=RolloutCorrectionConfig(...)``).
    """
    if isinstance(cfg, AlgorithmConfig):
        name = cfg.name if name is None else name
        overrides.setdefault("correction", cfg.rollout_correction)
        cfg = getattr(cfg, name) if name in ALGORITHMS else None
    if name not in ALGORITHMS:
        raise ValueError(
            f"get_algorithm: unknown algorithm {name!r}; choose from {sorted(ALGORITHMS)}"
        )
    return ALGORITHMS[name](cfg, **overrides)
