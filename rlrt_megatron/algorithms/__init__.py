"""Pure-torch RL algorithms: GRPO/DAPO, RLRT and the RLSD, SDPO, SRPO baselines.

Functions (formulas in their docstrings): :mod:`.advantages` (group_advantages, rlrt_advantages,
rlsd_advantages, lambda_schedule, dapo_keep_mask), :mod:`.losses` (policy_loss,
self_distillation_loss, sampled_token_distillation_loss, generalized_jsd, append_tail_bucket),
:mod:`.diagnostics` (asymmetry_stats, top_explore_tokens, position_kl), :mod:`.correction`
(rollout_correction: TIS / MIS weights for the trainer/rollout-engine mismatch).

The trainer uses the registry (:mod:`.registry`): ``algo = get_algorithm(name, cfg)``,
``prepared = algo.prepare(AlgoBatch(...))`` once per step, ``algo.loss(logprobs,
prepared.select(rows), num_tokens, topk=...)`` per micro-batch (inside ``values_checked()``:
``prepare`` validated the values, so the loss makes no host sync). Importing this package needs
only torch.
"""

from ._checks import values_checked
from .advantages import (
    dapo_keep_mask,
    group_advantages,
    lambda_schedule,
    rlrt_advantages,
    rlsd_advantages,
)
from .correction import (
    CORRECTION_LEVELS,
    CORRECTION_MODES,
    RolloutCorrectionConfig,
    rollout_correction,
)
from .diagnostics import asymmetry_stats, position_kl, top_explore_tokens
from .losses import (
    aggregate,
    append_tail_bucket,
    generalized_jsd,
    policy_loss,
    sampled_token_distillation_loss,
    self_distillation_loss,
)
from .registry import (
    ALGORITHMS,
    DAPO,
    GRPO,
    RLRT,
    RLSD,
    SDPO,
    SRPO,
    AlgoBatch,
    Algorithm,
    AlgorithmConfig,
    DAPOConfig,
    GRPOConfig,
    PPOConfig,
    Prepared,
    RLRTConfig,
    RLSDConfig,
    SDPOConfig,
    SRPOConfig,
    TopK,
    get_algorithm,
)

__all__ = [
    "ALGORITHMS",
    "CORRECTION_LEVELS",
    "CORRECTION_MODES",
    "DAPO",
    "GRPO",
    "RLRT",
    "RLSD",
    "SDPO",
    "SRPO",
    "AlgoBatch",
    "Algorithm",
    "AlgorithmConfig",
    "DAPOConfig",
    "GRPOConfig",
    "PPOConfig",
    "Prepared",
    "RLRTConfig",
    "RLSDConfig",
    "RolloutCorrectionConfig",
    "SDPOConfig",
    "SRPOConfig",
    "TopK",
    "aggregate",
    "append_tail_bucket",
    "asymmetry_stats",
    "dapo_keep_mask",
    "generalized_jsd",
    "get_algorithm",
    "group_advantages",
    "lambda_schedule",
    "policy_loss",
    "position_kl",
    "rlrt_advantages",
    "rlsd_advantages",
    "rollout_correction",
    "sampled_token_distillation_loss",
    "self_distillation_loss",
    "top_explore_tokens",
    "values_checked",
]
