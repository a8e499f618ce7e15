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

from typing import Any

from .base import AlgoBatch, Algorithm, Prepared, TopK
from .configs import (
    ALGORITHM_NAMES,
    AlgorithmConfig,
    DAPOConfig,
    GRPOConfig,
    PPOConfig,
    RLRTConfig,
    RLSDConfig,
    SDPOConfig,
    SRPOConfig,
)
from .distill import SDPO, SRPO, entropy_weights
from .pg import DAPO, GRPO, RLRT, RLSD

__all__ = [
    "ALGORITHMS",
    "AlgoBatch",
    "Algorithm",
    "AlgorithmConfig",
    "DAPO",
    "DAPOConfig",
    "GRPO",
    "GRPOConfig",
    "PPOConfig",
    "Prepared",
    "RLRT",
    "RLRTConfig",
    "RLSD",
    "RLSDConfig",
    "SDPO",
    "SDPOConfig",
    "SRPO",
    "SRPOConfig",
    "TopK",
    "entropy_weights",
    "get_algorithm",
]


ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (GRPO, DAPO, RLRT, RLSD, SDPO, SRPO)
}
if tuple(ALGORITHMS) != ALGORITHM_NAMES:  # the config validates names against the tuple
    raise AssertionError(f"configs.ALGORITHM_NAMES {ALGORITHM_NAMES} != {tuple(ALGORITHMS)}")


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
