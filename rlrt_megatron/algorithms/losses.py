"""Policy-gradient and self-distillation losses on padded [B, T] tensors.

All losses compute in fp32 and take optional mini-batch-wide normalisers (``num_tokens``,
``num_seqs``) so that summing the loss of several micro-batches gives the mini-batch loss exactly.
Masked positions never change the loss or any gradient: inputs there are replaced by 0 before any
arithmetic (``torch.where`` gives the unselected branch zero gradient).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import (
    as_tensor,
    check_finite_where,
    check_ndim,
    check_same_shape,
    check_token_inputs,
    f32,
    mask_bool,
    masked_f32,
)

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")

# exp(-1e4) == 0 in fp32: a -inf log-prob (an empty tail bucket) becomes a zero-probability
# bucket whose terms vanish instead of producing 0 * inf = NaN in values or gradients.
_LOGP_FLOOR = -1.0e4


def aggregate(
    token_losses: Tensor,
    mask: Tensor,
    agg: str = "token-mean",
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
) -> Tensor:
    """Reduce per-token losses l_it ([B, T], 0 at masked positions) to a scalar.

    - ``token-mean``:          ``sum_it m_it l_it / N_tok``, N_tok = num_tokens or sum m.
    - ``seq-mean-token-mean``: ``sum_i (sum_t m_it l_it / sum_t m_it) / N_seq``.
    - ``seq-mean-token-sum``:  ``sum_i (sum_t m_it l_it) / N_seq``.

    N_seq = num_seqs or the number of rows with at least one token. Pass the mini-batch-wide
    ``num_tokens`` / ``num_seqs`` when the loss is accumulated over micro-batches. An all-masked
    input gives 0 (not NaN).
    """
    if agg not in AGG_MODES:
        raise ValueError(f"aggregate: `agg` must be one of {AGG_MODES}, got {agg!r}")
    valid = mask_bool("aggregate", mask)
    m = valid.to(torch.float32)
    lm = torch.where(valid, token_losses, torch.zeros((), device=token_losses.device))
    if agg == "token-mean":
        denom = m.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=torch.float32)
        return lm.sum() / denom.clamp(min=1.0)
    lengths = m.sum(dim=1)
    seq = lm.sum(dim=1)
    if agg == "seq-mean-token-mean":
        seq = seq / lengths.clamp(min=1.0)
    if num_seqs is None:
        denom = (lengths > 0).to(torch.float32).sum()
    else:
        denom = torch.as_tensor(num_seqs, dtype=torch.float32)
    return seq.sum() / denom.clamp(min=1.0)


def _check_pg_inputs(
    fn: str, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor]:
    per_row = isinstance(advantages, Tensor) and advantages.dim() == 1
    valid = check_token_inputs(
        fn,
        mask,
        {"logprobs": logprobs, "old_logprobs": old_logprobs}
        | ({} if per_row else {"advantages": advantages}),
        {"advantages": advantages} if per_row else None,
    )
    if per_row:
        advantages = advantages[:, None].expand_as(mask)
        check_finite_where(fn, "advantages", advantages, valid)
    return valid, advantages


def ppo_token_losses(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO-clip loss with clip-higher and optional dual-clip.

    ``rho = exp(logp - logp_old)``;
    ``l = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)``;
    with ``dual_clip = c`` (> 1), tokens with ``A < 0`` use ``min(l, -c * A)``.
    ``A`` and ``logp_old`` are stop-gradient. Returns ``(l [B, T] fp32, 0 at masked positions,
    per-token indicator tensors for metrics)``.
    """
    fn = "ppo_token_losses"
    valid, advantages = _check_pg_inputs(fn, logprobs, old_logprobs, advantages, mask)
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"{fn}: `dual_clip` must be > 1 (or None), got {dual_clip}")
    logp = masked_f32(logprobs, valid)
    old = masked_f32(old_logprobs.detach(), valid)
    adv = masked_f32(advantages.detach(), valid)
    log_ratio = logp - old
    # Clamp before exp: a ratio of e^20 is already fully clipped; this only avoids inf * 0.
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    info = {
        "clipped": (clipped > unclipped) & valid,
        "clipped_low": (ratio < 1.0 - eps_low) & (adv < 0) & valid,
        "clipped_high": (ratio > 1.0 + eps_high) & (adv > 0) & valid,
        "log_ratio": log_ratio.detach(),
        "ratio": ratio.detach(),
    }
    if dual_clip is not None:
        lower = -adv * dual_clip
        dual = (adv < 0) & (loss > lower) & valid
        loss = torch.where(adv < 0, torch.minimum(loss, lower), loss)
        info["dual_clipped"] = dual
    loss = torch.where(valid, loss, torch.zeros((), device=loss.device))
    return loss, info


def _masked_mean(x: Tensor, valid: Tensor) -> Tensor:
    x = torch.where(valid, f32(x), torch.zeros((), device=x.device))
    return x.sum() / valid.sum().clamp(min=1)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    agg: str = "token-mean",
    dual_clip: float | None = None,
    *,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip policy loss (DAPO clip-higher), aggregated.

    ``L = agg_it( -min(rho_it A_it, clip(rho_it, 1 - eps_low, 1 + eps_high) A_it) )`` with
    ``rho = exp(logp - logp_old)``, optional dual-clip ``min(., -c A)`` for ``A < 0``, and
    ``agg`` one of :data:`AGG_MODES` (see :func:`aggregate`). ``advantages`` is [B, T] token
    advantages or [B] sequence advantages (broadcast over T); both it and ``old_logprobs`` are
    stop-gradient.

    Returns:
        (loss scalar fp32 with grad into ``logprobs``, metrics: ``clipfrac``, ``clipfrac_low``,
        ``clipfrac_high``, ``dual_clipfrac``, ``approx_kl`` = mean(logp_old - logp),
        ``kl_k3`` = mean(rho - 1 - log rho), ``ratio_mean``, ``ratio_max``; token means, 0-d
        tensors).
    """
    token_losses, info = ppo_token_losses(
        logprobs, old_logprobs, advantages, mask, eps_low, eps_high, dual_clip
    )
    valid = mask_bool("policy_loss", mask)
    loss = aggregate(token_losses, valid, agg, num_tokens, num_seqs)
    return loss, pg_metrics(info, valid)


def pg_metrics(info: dict[str, Tensor], valid: Tensor) -> dict[str, Tensor]:
    """Token-mean metrics from :func:`ppo_token_losses`' indicators, as 0-d fp32 tensors on the
    inputs' device (no host sync: the trainer reduces them once per mini-batch)."""
    with torch.no_grad():
        lr = info["log_ratio"]
        ratio = info["ratio"]
        out = {
            "clipfrac": _masked_mean(info["clipped"], valid),
            "clipfrac_low": _masked_mean(info["clipped_low"], valid),
            "clipfrac_high": _masked_mean(info["clipped_high"], valid),
            "approx_kl": _masked_mean(-lr, valid),
            "kl_k3": _masked_mean(ratio - 1.0 - lr, valid),
            "ratio_mean": _masked_mean(ratio, valid),
            # ratio > 0: the masked max is 0 only when nothing is valid
            "ratio_max": torch.where(valid, ratio, torch.zeros((), device=ratio.device)).amax()
            if ratio.numel()
            else torch.zeros((), device=ratio.device),
        }
        if "dual_clipped" in info:
            out["dual_clipfrac"] = _masked_mean(info["dual_clipped"], valid)
        return {k: f32(v) for k, v in out.items()}


def append_tail_bucket(topk_logprobs: Tensor) -> Tensor:
    """Append the tail bucket to top-k log-probs: ``[..., K] -> [..., K + 1]``.

    ``tail = log(1 - sum_k exp(l_k)) = log(-expm1(logsumexp_k l_k))``, with ``logsumexp`` clamped
    to ``<= -1e-7`` so the tail stays finite when the top-k hold (numerically) all the mass.
    """
    x = f32(topk_logprobs)
    lse = torch.logsumexp(x, dim=-1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([x, torch.log(-torch.expm1(lse))], dim=-1)


def _kl(p_logprobs: Tensor, q_logprobs: Tensor) -> Tensor:
    """``KL(p || q) = sum_v p_v (log p_v - log q_v)`` over the last dim; 0 log 0 = 0."""
    p = torch.exp(p_logprobs)
    return (p * (p_logprobs - q_logprobs)).sum(dim=-1)


def generalized_jsd(
    student_logprobs: Tensor, teacher_logprobs: Tensor, beta: float = 0.5
) -> Tensor:
    """Generalized Jensen-Shannon divergence over the last dim (GKD / SDPO convention).

    With S = student, T = teacher (normalised distributions given as log-probs) and the mixture
    ``M = beta * T + (1 - beta) * S``::

        JSD_beta = beta * KL(T || M) + (1 - beta) * KL(S || M)     0 < beta < 1
        JSD_0    = KL(T || S)   ("forward KL": mode-covering, the usual distillation direction)
        JSD_1    = KL(S || T)   ("reverse KL": mode-seeking, on-policy distillation)

    The endpoints are defined separately, as in SDPO's reference code and TRL's GKD (the mixture
    formula itself tends to 0 at both ends). Log-probs below -1e4 (including -inf, e.g. an
    empty tail bucket) count as probability 0.

    Returns:
        [...] fp32 divergence per position (leading dims of the inputs).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd: `beta` must be in [0, 1], got {beta}")
    s = f32(student_logprobs).clamp(min=_LOGP_FLOOR)
    t = f32(teacher_logprobs).clamp(min=_LOGP_FLOOR)
    # within float64 rounding of an end point, the end point: otherwise JSD_beta(S, T) and
    # JSD_{1-beta}(T, S) disagree where 1 - beta rounds to 1.0 (e.g. beta = 5e-324)
    beta = 0.0 if beta < 1e-15 else 1.0 if beta > 1.0 - 1e-15 else beta
    if beta == 0.0:
        return _kl(t, s)
    if beta == 1.0:
        return _kl(s, t)
    mix = torch.logaddexp(t + math.log(beta), s + math.log(1.0 - beta))
    return beta * _kl(t, mix) + (1.0 - beta) * _kl(s, mix)


def self_distillation_loss(
    student_topk_logprobs: Tensor,
    teacher_topk_logprobs: Tensor,
    mask: Tensor,
    beta: float = 0.5,
    is_weights: Tensor | None = None,
    *,
    num_tokens: float | Tensor | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SDPO distillation loss: generalized JSD over the student's top-k ids plus a tail bucket.

    ``L = sum_it m_it u_it c_it JSD_beta(S_it, T_it) / N_tok`` where S_it, T_it are the
    (K + 1)-bucket distributions (top-k log-probs at the student's top-k ids + the tail
    bucket, see :func:`append_tail_bucket`), ``c_it`` = ``is_weights`` (the trainer or the
    registry passes ``min(pi / pi_old, 2)``, stop-gradient; 1 if None), ``u_it`` =
    ``token_weights`` (SRPO's entropy weights, stop-gradient; 1 if None) and
    N_tok = ``num_tokens`` or ``sum m``. The teacher side is stop-gradient.

    Args:
        student_topk_logprobs: [B, T, K+1] with grad. teacher_topk_logprobs: [B, T, K+1].
        mask: [B, T]. is_weights, token_weights: [B, T] or None.
    Returns:
        (loss scalar, metrics: ``jsd_mean`` (unweighted token mean), ``is_weight_mean``; 0-d
        tensors).
    """
    fn = "self_distillation_loss"
    as_tensor(fn, "student_topk_logprobs", student_topk_logprobs)
    as_tensor(fn, "teacher_topk_logprobs", teacher_topk_logprobs)
    as_tensor(fn, "mask", mask)
    check_ndim(fn, "mask", mask, 2)
    check_ndim(fn, "student_topk_logprobs", student_topk_logprobs, 3)
    check_same_shape(
        fn,
        "teacher_topk_logprobs",
        teacher_topk_logprobs,
        "student_topk_logprobs",
        student_topk_logprobs,
    )
    if student_topk_logprobs.shape[:2] != mask.shape:
        raise ValueError(
            f"{fn}: `student_topk_logprobs` has shape {tuple(student_topk_logprobs.shape)}, "
            f"its first two dims must equal `mask` {tuple(mask.shape)}"
        )
    valid = mask_bool(fn, mask)
    valid3 = valid[..., None].expand_as(student_topk_logprobs)
    check_finite_where(
        fn, "student_topk_logprobs", student_topk_logprobs.detach(), valid3, allow_neg_inf=True
    )
    check_finite_where(fn, "teacher_topk_logprobs", teacher_topk_logprobs, valid3, True)
    ones = torch.ones(mask.shape, dtype=torch.float32, device=mask.device)
    weights = []
    for name, w in (("is_weights", is_weights), ("token_weights", token_weights)):
        if w is None:
            weights.append(ones)
            continue
        as_tensor(fn, name, w)
        check_same_shape(fn, name, w, "mask", mask)
        check_finite_where(fn, name, w, valid)
        weights.append(masked_f32(w.detach(), valid))
    s = masked_f32(student_topk_logprobs, valid3)
    t = masked_f32(teacher_topk_logprobs.detach(), valid3)
    jsd = generalized_jsd(s, t, beta)
    per_token = jsd * weights[0] * weights[1]
    loss = aggregate(per_token, valid, "token-mean", num_tokens)
    with torch.no_grad():
        metrics = {
            "jsd_mean": _masked_mean(jsd, valid),
            "is_weight_mean": _masked_mean(weights[0], valid),
        }
    return loss, metrics


def sampled_token_distillation_loss(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    is_weights: Tensor | None = None,
    *,
    num_tokens: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SDPO's sampled-token variant: ``L = sum_it m_it c_it sg(s_it - tau_it) s_it / N_tok``.

    Its gradient ``(s - tau) grad s`` is the single-sample estimate of grad KL(pi_S || pi_T)
    at the sampled token. ``c_it`` = ``is_weights`` (1 if None), N_tok = ``num_tokens`` or
    ``sum m``; ``teacher_logprobs`` is stop-gradient.

    Returns:
        (loss scalar, metrics: ``logp_diff`` = token mean of s - tau, a 0-d tensor).
    """
    fn = "sampled_token_distillation_loss"
    as_tensor(fn, "student_logprobs", student_logprobs)
    as_tensor(fn, "teacher_logprobs", teacher_logprobs)
    as_tensor(fn, "mask", mask)
    check_ndim(fn, "mask", mask, 2)
    check_same_shape(fn, "student_logprobs", student_logprobs, "mask", mask)
    check_same_shape(fn, "teacher_logprobs", teacher_logprobs, "mask", mask)
    valid = mask_bool(fn, mask)
    check_finite_where(fn, "student_logprobs", student_logprobs.detach(), valid)
    check_finite_where(fn, "teacher_logprobs", teacher_logprobs, valid)
    s = masked_f32(student_logprobs, valid)
    t = masked_f32(teacher_logprobs.detach(), valid)
    c = torch.ones_like(t)
    if is_weights is not None:
        as_tensor(fn, "is_weights", is_weights)
        check_same_shape(fn, "is_weights", is_weights, "mask", mask)
        c = masked_f32(is_weights.detach(), valid)
    diff = (s - t).detach()
    loss = aggregate(c * diff * s, valid, "token-mean", num_tokens)
    return loss, {"logp_diff": _masked_mean(diff, valid)}


def clipped_is_weights(
    logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, clip: float = 2.0
) -> Tensor:
    """SDPO's importance weight ``c_it = min(exp(clamp(logp - logp_old, -20, 20)), clip)``,
    stop-gradient, 0 at masked positions."""
    valid = mask_bool("clipped_is_weights", mask)
    lr = masked_f32(logprobs.detach(), valid) - masked_f32(old_logprobs.detach(), valid)
    return torch.exp(lr.clamp(-20.0, 20.0)).clamp(max=clip) * valid.to(torch.float32)
