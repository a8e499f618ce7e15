"""Teacher/student asymmetry diagnostics logged every step (DESIGN.md "Diagnostics").

``Delta_it = tau_it - s_it`` (teacher minus student log-prob of the sampled token) and the RLRT
weight on correct rollouts ``w_it = exp(-Delta_it) = pi_S / pi_T``: w > 1 (Delta < 0) marks a
token where the student chose against the teacher, an "explore" token that RLRT up-weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import (
    check_token_inputs,
    f32,
    mask_bool,
)
from .advantages import CORRECT_THRESHOLD, _teacher_delta
from .losses import generalized_jsd


def _inputs(
    fn: str, student_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor, rewards: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    valid = check_token_inputs(
        fn,
        mask,
        {"student_logprobs": student_logprobs, "teacher_logprobs": teacher_logprobs},
        {"rewards": rewards},
    )
    delta = _teacher_delta(student_logprobs, teacher_logprobs, valid)
    correct = f32(rewards.detach()) > CORRECT_THRESHOLD
    return delta, valid, correct


def _mean(x: Tensor, sel: Tensor) -> float:
    n = int(sel.sum())
    return float(torch.where(sel, x, torch.zeros((), device=x.device)).sum() / n) if n else 0.0


@torch.no_grad()
def asymmetry_stats(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    eps_w: float = 0.2,
) -> dict[str, float]:
    """Token statistics of ``Delta = tau - s`` split by correct (r > 0.5) / incorrect rollouts.

    Keys (python floats; a mean over an empty set is 0.0, see the ``tokens_*`` counts):
    ``delta_mean``, ``delta_mean_correct``, ``delta_mean_incorrect``;
    ``frac_delta_neg_correct`` = share of correct-rollout tokens with Delta < 0 (w > 1);
    ``frac_delta_neg_incorrect``; ``w_mean_correct`` = mean of ``exp(-Delta)`` on correct rollouts;
    ``frac_clipped_correct`` = share of correct-rollout tokens with ``w`` outside
    ``[1 - eps_w, 1 + eps_w]`` (``frac_clip_high_correct``, ``frac_clip_low_correct`` split it);
    ``sampled_kl_student_teacher`` = mean of ``s - tau`` over all tokens (the Monte-Carlo
    KL(pi_S || pi_T) estimate on sampled tokens); ``tokens_correct``, ``tokens_incorrect``.
    """
    delta, valid, correct = _inputs(
        "asymmetry_stats", student_logprobs, teacher_logprobs, mask, rewards
    )
    on_c = valid & correct[:, None]
    on_i = valid & ~correct[:, None]
    w = torch.exp(-delta)
    return {
        "delta_mean": _mean(delta, valid),
        "delta_mean_correct": _mean(delta, on_c),
        "delta_mean_incorrect": _mean(delta, on_i),
        "frac_delta_neg_correct": _mean((delta < 0).float(), on_c),
        "frac_delta_neg_incorrect": _mean((delta < 0).float(), on_i),
        "w_mean_correct": _mean(w, on_c),
        "frac_clipped_correct": _mean(((w > 1 + eps_w) | (w < 1 - eps_w)).float(), on_c),
        "frac_clip_high_correct": _mean((w > 1 + eps_w).float(), on_c),
        "frac_clip_low_correct": _mean((w < 1 - eps_w).float(), on_c),
        "sampled_kl_student_teacher": _mean(-delta, valid),
        "tokens_correct": float(on_c.sum()),
        "tokens_incorrect": float(on_i.sum()),
    }


@torch.no_grad()
def position_kl(
    student_dist_logprobs: Tensor, teacher_dist_logprobs: Tensor, mask: Tensor
) -> float:
    """Position-level asymmetry ``mean_it KL(pi_S(.|it) || pi_T(.|it))`` over unmasked
    positions, from full (or top-k + tail) distributions ``[B, T, V]`` given as log-probs."""
    valid = mask_bool("position_kl", mask)
    kl = generalized_jsd(student_dist_logprobs, teacher_dist_logprobs, beta=1.0)
    return _mean(kl, valid)


@torch.no_grad()
def top_explore_tokens(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    token_ids: Tensor | None = None,
    k: int = 10,
) -> list[dict[str, float | int]]:
    """The ``k`` tokens of correct rollouts with the largest ``w = pi_S / pi_T = exp(s - tau)``.

    Returns a list (largest w first) of dicts ``{row, pos, w, delta, student_logprob,
    teacher_logprob[, token_id]}``; ``token_ids`` [B, T] adds the sampled id for decoding.
    """
    delta, valid, correct = _inputs(
        "top_explore_tokens", student_logprobs, teacher_logprobs, mask, rewards
    )
    sel = valid & correct[:, None]
    score = torch.where(sel, -delta, torch.full((), float("-inf"), device=delta.device))
    n = min(int(k), int(sel.sum()))
    if n <= 0:
        return []
    vals, flat = torch.topk(score.flatten(), n)
    t = delta.shape[1]
    out: list[dict[str, float | int]] = []
    for v, f in zip(vals.tolist(), flat.tolist(), strict=True):
        row, pos = divmod(f, t)
        item: dict[str, float | int] = {
            "row": row,
            "pos": pos,
            "w": float(torch.exp(torch.tensor(v))),
            "delta": -v,
            "student_logprob": float(student_logprobs[row, pos]),
            "teacher_logprob": float(teacher_logprobs[row, pos]),
        }
        if token_ids is not None:
            item["token_id"] = int(token_ids[row, pos])
        out.append(item)
    return out
