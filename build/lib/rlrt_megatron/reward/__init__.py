"""Rewards: math-verify on the final answer, isolated in worker processes with a timeout."""

from rlrt_megatron.reward.math import MathReward, RewardResult, check_answer, extract_final_answer

__all__ = ["MathReward", "RewardResult", "check_answer", "extract_final_answer"]
