"""The algorithm configs: one dataclass per algorithm (`algorithm.<name>.<field>` in the trainer's
config), each validating itself in `__post_init__`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .correction import RolloutCorrectionConfig
from .losses import (
    AGG_MODES,
)

# ----------------------------------------------------------------------------- configs


# The registry's keys (`registry.ALGORITHMS`, checked there to match).
ALGORITHM_NAMES = ("grpo", "dapo", "rlrt", "rlsd", "sdpo", "srpo")


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
        topk: k of the current student's top-k ids (+ 1 tail bucket), taken per mini-batch
            (100).
        ema_rate: teacher EMA rate (0.05); 0 = the initial policy, frozen (the setting the
            RLRT authors report for their SDPO baseline).
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
        if not 0.0 <= self.ema_rate <= 1.0:
            raise ValueError(
                f"{name}.ema_rate must be in [0, 1] (0 = a frozen teacher), got {self.ema_rate}"
            )
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
        scale_by_std: False (default) = the paper's unbiased GRPO branch, A_i = r_i - mean_g(r)
            (Dr.GRPO); True divides by the group std.
    """

    scale_by_std: bool = False

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
        if self.name not in ALGORITHM_NAMES:
            raise ValueError(
                f"AlgorithmConfig.name must be one of {sorted(ALGORITHM_NAMES)}, got {self.name!r}"
            )

    def selected(self) -> Any:
        """The config of the selected algorithm."""
        return getattr(self, self.name)
