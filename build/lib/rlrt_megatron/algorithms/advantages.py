"""Group advantages and the token-level reshaping of RLRT and RLSD.

Notation (DESIGN.md "Algorithms"): rewards r_i, group of G rollouts per prompt (rows
``g*G .. g*G+G-1`` form group g), student log-prob s_it and teacher log-prob tau_it of the sampled
token, ``Delta_it = stopgrad(tau_it - s_it)``, 0/1 ``mask`` m_it. Every weight here is
stop-gradient: these functions return detached tensors and never build a graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import (
    as_tensor,
    check_finite_where,
    check_ndim,
    check_token_inputs,
    f32,
    masked_f32,
)

CORRECT_THRESHOLD = 0.5
"""A rollout with reward > 0.5 counts as correct (rewards are 0/1 from math-verify)."""


def group_advantages(
    rewards: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO group-relative advantage.

    ``A_i = (r_i - mean_g r) / (std_g r + eps)`` with ``std_g`` the unbiased (Bessel, as TRL and
    verl) standard deviation over the G rollouts of i's group; ``scale_by_std=False`` gives
    Dr.GRPO's ``A_i = r_i - mean_g r``. A group of identical rewards gets exactly 0 (no NaN); with
    ``group_size == 1`` the advantage is 0.

    Args:
        rewards: [N] scalar rewards, N = num_groups * group_size, group-contiguous rows.
        group_size: G.
    Returns:
        [N] fp32 advantages (detached).
    """
    fn = "group_advantages"
    rewards = as_tensor(fn, "rewards", rewards)
    check_ndim(fn, "rewards", rewards, 1)
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{fn}: `group_size` must be a positive int, got {group_size!r}")
    n = rewards.shape[0]
    if n % group_size != 0:
        raise ValueError(
            f"{fn}: `rewards` has shape ({n},), not divisible by group_size={group_size}"
        )
    check_finite_where(fn, "rewards", rewards, torch.ones_like(rewards, dtype=torch.bool))
    r = f32(rewards.detach()).view(n // group_size, group_size)
    # The mean of identical floats can round off the value itself; (tiny) / (tiny std + eps)
    # would then be O(1) noise, so all-equal groups are set to exactly 0.
    same = r.max(dim=1, keepdim=True).values == r.min(dim=1, keepdim=True).values
    centered = torch.where(same, torch.zeros((), device=r.device), r - r.mean(dim=1, keepdim=True))
    if scale_by_std:
        if group_size == 1:
            return torch.zeros(n, dtype=torch.float32, device=rewards.device)
        std = r.std(dim=1, keepdim=True, correction=1)
        centered = centered / (std + eps)
    return centered.reshape(n)


def _check_token_inputs(
    fn: str,
    advantages: Tensor,
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor | None = None,
    has_teacher: Tensor | None = None,
) -> Tensor:
    valid = check_token_inputs(
        fn,
        mask,
        {"student_logprobs": student_logprobs, "teacher_logprobs": teacher_logprobs},
        {"advantages": advantages, "rewards": rewards, "has_teacher": has_teacher},
    )
    rows = torch.ones_like(advantages, dtype=torch.bool)
    check_finite_where(fn, "advantages", advantages, rows)
    return valid


def _reweighted(
    advantages: Tensor,
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    valid: Tensor,
    direction: float,
    mix: float,
    eps_w: float,
    gate: Tensor | None,
    has_teacher: Tensor | None,
) -> Tensor:
    """The shared shape of RLRT (``direction=-1``, ``mix=alpha``) and RLSD (``+1``, ``lam``):
    ``w = clip(exp(direction * sign(A_i) * Delta_it), 1 - eps_w, 1 + eps_w)``,
    ``Ahat_it = A_i * ((1 - mix) + mix * w_it) * m_it`` on rows where ``gate & has_teacher``,
    ``A_i * m_it`` elsewhere (None = every row)."""
    delta = _teacher_delta(student_logprobs, teacher_logprobs, valid)
    a = f32(advantages.detach()).to(valid.device)
    w = torch.exp(direction * torch.sign(a)[:, None] * delta).clamp(1.0 - eps_w, 1.0 + eps_w)
    factor = (1.0 - mix) + mix * w
    rows = torch.ones_like(a, dtype=torch.bool) if gate is None else gate
    if has_teacher is not None:
        rows = rows & has_teacher.to(device=valid.device, dtype=torch.bool)
    factor = torch.where(rows[:, None], factor, torch.ones_like(w))
    return a[:, None] * factor * valid.to(torch.float32)


def _teacher_delta(student_logprobs: Tensor, teacher_logprobs: Tensor, valid: Tensor) -> Tensor:
    """``Delta = stopgrad(tau - s)``, 0 at masked positions."""
    return masked_f32(teacher_logprobs.detach(), valid) - masked_f32(
        student_logprobs.detach(), valid
    )


def rlrt_advantages(
    advantages: Tensor,
    rewards: Tensor,
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    alpha: float = 1.0,
    eps_w: float = 0.2,
    has_teacher: Tensor | None = None,
    reward_gate: bool = True,
) -> Tensor:
    """RLRT token advantages: the RLSD weight reversed and reward-gated (Kim et al. 2026).

    ``Delta_it = stopgrad(tau_it - s_it)``, ``w_it = exp(-sign(A_i) * Delta_it)``
    (= pi_S / pi_T on a correct rollout with A_i > 0: > 1 where the student chose against the
    teacher); with ``g_i = [r_i > 0.5] * has_teacher_i``::

        Ahat_it = A_i * ((1 - alpha) + alpha * clip(w_it, 1 - eps_w, 1 + eps_w))   if g_i
        Ahat_it = A_i                                                             otherwise

    times ``m_it`` (masked positions are 0). ``alpha = 0`` is exactly GRPO's ``A_i * m_it``;
    ``Ahat_it`` lies between ``A_i (1 - alpha eps_w)`` and ``A_i (1 + alpha eps_w)``.
    ``reward_gate=False`` is the "RLRT-all" ablation (the gate drops ``[r_i > 0.5]``; it
    collapsed in the paper, keep the default).

    Args:
        advantages: [B] sequence advantages A_i. rewards: [B]. has_teacher: [B] bool or None (all).
        student_logprobs, teacher_logprobs, mask: [B, T].
    Returns:
        [B, T] fp32 token advantages (detached).
    """
    fn = "rlrt_advantages"
    valid = _check_token_inputs(
        fn, advantages, student_logprobs, teacher_logprobs, mask, rewards, has_teacher
    )
    gate = None
    if reward_gate:
        gate = f32(rewards.detach()).to(mask.device) > CORRECT_THRESHOLD
    return _reweighted(
        advantages, student_logprobs, teacher_logprobs, valid, -1.0, alpha, eps_w, gate, has_teacher
    )


def rlsd_advantages(
    advantages: Tensor,
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    eps_w: float = 0.2,
    lam: float = 0.5,
    has_teacher: Tensor | None = None,
) -> Tensor:
    """RLSD token advantages (Yang et al. 2026), applied on every rollout.

    ``w_it = clip(exp(sign(A_i) * Delta_it), 1 - eps_w, 1 + eps_w)`` with
    ``Delta_it = stopgrad(tau_it - s_it)``;
    ``Ahat_it = A_i * ((1 - lam) + lam * w_it) * m_it``. Rows with ``has_teacher == False`` keep
    ``A_i * m_it``. ``w > 1`` exactly where ``sign(A_i) * Delta_it > 0`` (the teacher agrees more
    than the student on a rewarded rollout, or less on a penalised one).

    Returns:
        [B, T] fp32 token advantages (detached).
    """
    fn = "rlsd_advantages"
    valid = _check_token_inputs(
        fn, advantages, student_logprobs, teacher_logprobs, mask, None, has_teacher
    )
    return _reweighted(
        advantages, student_logprobs, teacher_logprobs, valid, 1.0, lam, eps_w, None, has_teacher
    )


def lambda_schedule(step: int, init: float = 0.5, decay_steps: int | None = 50) -> float:
    """RLSD's lambda: ``lam(step) = init * max(0, 1 - step / decay_steps)``.

    Linear decay from ``init`` at step 0 to 0 at ``decay_steps`` and after; ``decay_steps=None``
    keeps ``init`` constant.
    """
    if step < 0:
        raise ValueError(f"lambda_schedule: `step` must be >= 0, got {step}")
    if decay_steps is None:
        return float(init)
    if decay_steps <= 0:
        raise ValueError(
            f"lambda_schedule: `decay_steps` must be > 0 (or None for constant), got {decay_steps}"
        )
    return float(init) * max(0.0, 1.0 - step / decay_steps)


def dapo_keep_mask(rewards: Tensor, group_size: int) -> Tensor:
    """DAPO dynamic-sampling filter: keep a group iff its rewards are not all equal.

    ``keep_i = max_g r != min_g r`` for i's group g. Groups of identical rewards have zero
    advantage and only dilute the token-mean; the trainer drops them (and may resample).

    Returns:
        [N] bool.
    """
    fn = "dapo_keep_mask"
    rewards = as_tensor(fn, "rewards", rewards)
    check_ndim(fn, "rewards", rewards, 1)
    n = rewards.shape[0]
    if not isinstance(group_size, int) or group_size < 1 or n % group_size != 0:
        raise ValueError(
            f"{fn}: `rewards` has shape ({n},), not divisible by group_size={group_size!r}"
        )
    r = f32(rewards.detach()).view(n // group_size, group_size)
    keep = r.max(dim=1).values != r.min(dim=1).values
    return keep.repeat_interleave(group_size)
