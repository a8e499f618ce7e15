"""Rollout correction: reweight tokens by the trainer / rollout-engine probability ratio.

The rollout engine and the trainer never compute exactly the same probabilities (bf16 kernels,
another attention implementation, FP8 rollouts, or weights one step older with asynchronous
rollouts). The tokens were sampled from the engine's ``pi_rollout`` while the loss treats them as
samples of the trainer's ``pi_old``; the importance ratio between the two,

    ``r_it = pi_old(y_it) / pi_rollout(y_it) = exp(old_it - rollout_it)``,

corrects that, and :func:`rollout_correction` turns it into a per-token weight that the
algorithms (:mod:`.registry`) multiply into each token's policy-gradient (or distillation) term:

- ``none``: ``w = 1`` (the loss is bit-identical to no correction);
- ``tis`` (truncated importance sampling, verl rollout IS / slime ``--use-tis``):
  ``w = min(r, cap)``;
- ``mis`` (masked importance sampling, "icepop"): ``w = 1`` where ``low <= r <= cap``, else 0
  (``low`` defaults to ``1 / cap``): tokens the two sides disagree on drop out of the loss.

``old`` is the trainer's recompute (``train.recompute_old_logprobs=true``, the default). With
the engine's log-probs as PPO's old log-probs instead, the PPO ratio already spans the mismatch
and a correction would count it twice: the config refuses tis / mis there.

``level`` (as verl's rollout correction names them):

- ``token``: one ratio per token, ``r_it``;
- ``sequence``: one ratio per row, the product of its token ratios
  ``prod_t r_it = exp(sum_t (old_it - rollout_it))`` (the log clamped to [-20, 20] before the
  exp, verl's safety bound), for every token of the row; ``tis`` then truncates that product at
  ``cap`` and ``mis`` keeps the row only where ``low <= prod <= cap`` (verl's sequence-level
  TIS / rejection);
- ``geometric``: one ratio per row, the geometric mean of its token ratios
  ``exp(mean_t (old_it - rollout_it))`` (length-normalised, verl's ``geometric`` rejection
  level), truncated / masked the same way. (Configs before this name existed called it
  ``sequence``: use ``geometric`` for the old behaviour.)

Metrics (python floats, over the masked tokens, independent of ``level``), with
``d = rollout - old``:

- ``mismatch/k3``: ``mean(exp(d) - d - 1)``, the k3 estimate of the KL between the two sides
  (0 when they agree; ~1e-5 for fp32 vs fp32 kernels, ~1e-3 for a bf16 engine);
- ``mismatch/max_abs``: ``max |d|``;
- ``mismatch/clip_frac``: share of tokens whose weight differs from the raw ratio (``tis``: the
  ratio was above ``cap``; ``mis``: the token was zeroed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ._checks import check_token_inputs, f32

CORRECTION_MODES = ("none", "tis", "mis")
CORRECTION_LEVELS = ("token", "sequence", "geometric")

# exp(20) ~ 5e8: any cap below it truncates long before; this only keeps exp finite.
_MAX_LOG_RATIO = 20.0


@dataclass
class RolloutCorrectionConfig:
    """Trainer/rollout-engine mismatch correction (``algorithm.rollout_correction.*``).

    Attributes:
        mode: "none" (weight 1, loss unchanged) | "tis" (min(ratio, cap)) | "mis" (1 where
            low <= ratio <= cap, else 0); ratio = pi_trainer / pi_engine of each sampled token.
        cap: upper bound of the ratio (2.0); > 0, inf allowed (tis without truncation).
        low: mis lower bound; None = 1 / cap. Only for mode mis.
        level: "token" (one ratio per token) | "sequence" (one per row: the product of its
            token ratios) | "geometric" (one per row: their geometric mean; what `sequence`
            meant before the product existed).
    """

    mode: Literal["none", "tis", "mis"] = "none"
    cap: float = 2.0
    low: float | None = None
    level: Literal["token", "sequence", "geometric"] = "token"

    def __post_init__(self) -> None:
        _check_settings("RolloutCorrectionConfig", self.mode, self.cap, self.low, self.level)


def _check_settings(fn: str, mode: str, cap: float, low: float | None, level: str) -> float:
    """Validate; return the effective lower bound of mis (0 for the other modes)."""
    if mode not in CORRECTION_MODES:
        raise ValueError(f"{fn}: `mode` must be one of {CORRECTION_MODES}, got {mode!r}")
    if level not in CORRECTION_LEVELS:
        raise ValueError(
            f"{fn}: `level` must be one of {CORRECTION_LEVELS}, got {level!r} (the geometric mean "
            "of the token ratios is `geometric`, their product `sequence`)"
        )
    if not cap > 0.0:  # also rejects NaN
        raise ValueError(f"{fn}: `cap` must be > 0 (inf = no upper bound), got {cap}")
    if low is not None and mode != "mis":
        raise ValueError(f"{fn}: `low` applies to mode 'mis' only (mode={mode!r}); drop it")
    if mode != "mis":
        return 0.0
    lo = 1.0 / cap if low is None else float(low)
    if not 0.0 <= lo <= cap:
        raise ValueError(f"{fn}: mis needs 0 <= low <= cap, got low={lo}, cap={cap}")
    return lo


@torch.no_grad()
def rollout_correction(
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    mask: Tensor,
    mode: str = "tis",
    cap: float = 2.0,
    low: float | None = None,
    level: str = "token",
) -> tuple[Tensor, dict[str, float]]:
    """Per-token correction weights for the trainer/engine mismatch (module docstring).

    Args:
        old_logprobs: [B, T] the trainer's log-probs of the sampled tokens (its recompute).
        rollout_logprobs: [B, T] the rollout engine's log-probs of the same tokens.
        mask: [B, T] 0/1 or bool response mask; rows may be empty.
        mode: "none" | "tis" | "mis". cap: ratio upper bound (> 0). low: mis lower bound
            (None = 1 / cap). level: "token" | "sequence" | "geometric".
    Returns:
        (weights [B, T] fp32, detached, 0 outside ``mask``; metrics ``mismatch/k3``,
        ``mismatch/max_abs``, ``mismatch/clip_frac`` as python floats, 0 for an empty mask).
    """
    fn = "rollout_correction"
    lo = _check_settings(fn, mode, cap, low, level)
    valid = check_token_inputs(
        fn, mask, {"old_logprobs": old_logprobs, "rollout_logprobs": rollout_logprobs}
    )
    zero = torch.zeros((), dtype=torch.float32, device=valid.device)
    m = valid.to(torch.float32)
    # old - rollout at valid positions, 0 elsewhere (garbage there never reaches an exp)
    log_ratio = torch.where(valid, f32(old_logprobs) - f32(rollout_logprobs), zero)
    if level == "sequence":  # log of the product of the token ratios, verl's safety bound
        log_ratio = log_ratio.sum(dim=1, keepdim=True).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        log_ratio = log_ratio.expand_as(m)
    elif level == "geometric":
        n = m.sum(dim=1, keepdim=True)
        log_ratio = (log_ratio.sum(dim=1, keepdim=True) / n.clamp(min=1.0)).expand_as(m)
    ratio = torch.exp(log_ratio.clamp(max=_MAX_LOG_RATIO))
    # a ratio whose exp was clamped is above any finite cap below exp(20) anyway
    if mode == "none":
        weights, changed = torch.ones_like(ratio), torch.zeros_like(valid)
    elif mode == "tis":
        changed = ratio > cap
        weights = torch.where(changed, torch.full_like(ratio, min(cap, math.exp(20.0))), ratio)
    else:
        changed = (ratio < lo) | (ratio > cap)
        weights = (~changed).to(torch.float32)
    weights = (weights * m).detach()
    n_tok = m.sum()
    d = torch.where(valid, f32(rollout_logprobs) - f32(old_logprobs), zero)
    k3 = torch.where(valid, torch.expm1(d) - d, zero)  # exp(d) - d - 1, exact near 0
    metrics = {
        "mismatch/k3": float(k3.sum() / n_tok.clamp(min=1.0)),
        "mismatch/max_abs": float(d.abs().max()) if d.numel() else 0.0,
        "mismatch/clip_frac": float((changed & valid).sum() / n_tok.clamp(min=1.0)),
    }
    return weights, metrics


__all__ = [
    "CORRECTION_LEVELS",
    "CORRECTION_MODES",
    "RolloutCorrectionConfig",
    "rollout_correction",
]
