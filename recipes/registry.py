"""The recipe registry and the model x algorithm tables the paper-scale recipes come from."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from rlrt_megatron.config import ConfigError, TrainConfig, apply_overrides

_RECIPES: dict[str, Callable[[], TrainConfig]] = {}


def register_recipe(name: str) -> Callable[[Callable[[], TrainConfig]], Callable[[], TrainConfig]]:
    """Decorator adding a zero-argument config function to the registry."""

    def deco(fn: Callable[[], TrainConfig]) -> Callable[[], TrainConfig]:
        _RECIPES[name] = fn
        return fn

    return deco


def list_recipes() -> list[str]:
    return sorted(_RECIPES)


def get_recipe(name: str, overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """Build recipe `name`, apply dotted `overrides`, validate (without model/world info)."""
    if name not in _RECIPES:
        close = difflib.get_close_matches(name, list(_RECIPES), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"--recipe {name}: unknown recipe{hint} (see `rlrt train --list`)")
    cfg = _RECIPES[name]()
    if overrides:
        apply_overrides(cfg, overrides)
    return cfg.validate()


# The paper's shared RL settings (Kim et al. 2026, also used for every baseline).
PAPER = {
    "train.prompts_per_step": 256,
    "rollout.group_size": 8,
    "train.mini_batch_prompts": 128,
    "rollout.max_new_tokens": 20480,
    "optimizer.lr": 1e-6,
    "rollout.temperature": 1.0,
    "rollout.top_p": 1.0,
    "optimizer.weight_decay": 0.1,
    "optimizer.clip_grad": 1.0,
    "optimizer.schedule": "constant",
    "train.steps": 500,
    "train.max_tokens_per_microbatch": 24576,
    "data.max_prompt_tokens": 2048,
    "data.path": "data/dapo-math-17k.parquet",
    "data.prompt_key": "prompt",
    "data.answer_key": "reward_model.ground_truth",
    "data.solution_key": "",
    "rollout.engine": "sglang",
    "model.spec": "te",
    "model.params_dtype": "bfloat16",
    "checkpoint.save_every": 20,
    "checkpoint.keep_last": 2,
    "eval.every": 50,
    # bf16 SGLang rollouts vs the trainer: truncated importance sampling of the mismatch
    "algorithm.rollout_correction.mode": "tis",
    "algorithm.rollout_correction.cap": 2.0,
}

# PPO clip-higher, shared by every algorithm with a PPO term.
CLIP = {"eps_low": 0.2, "eps_high": 0.28}

# model row: the local HF directory and the 8xH100 node layout.
MODELS: dict[str, dict[str, Any]] = {
    "qwen3_4b_base": {
        "model.hf_path": "checkpoints/hf/Qwen3-4B-Base",
        "parallel.tp": 2,
        "parallel.pp": 1,
        "rollout.sglang_tp": 1,
    },
    "qwen3_8b": {
        "model.hf_path": "checkpoints/hf/Qwen3-8B",
        "parallel.tp": 4,
        "parallel.pp": 1,
        "rollout.sglang_tp": 2,
    },
    "llama3_8b": {
        "model.hf_path": "checkpoints/hf/Llama-3.1-8B-Instruct",
        "parallel.tp": 4,
        "parallel.pp": 1,
        "rollout.sglang_tp": 2,
    },
    # Qwen3-30B-A3B (128 experts, top-8): experts split over 8 GPUs (EP), attention over 2 (TP,
    # with the sequence parallelism megatron needs for MoE), layers over 2 stages; fits 4 x 8
    # H100 (`rlrt plan`). 8K-token responses: a 10K-token sequence's activations fit next to the
    # experts without activation recompute.
    "qwen3_30b_a3b": {
        "model.hf_path": "checkpoints/hf/Qwen3-30B-A3B",
        "parallel.tp": 2,
        "parallel.pp": 2,
        "parallel.ep": 8,
        "parallel.etp": 1,
        "parallel.sequence_parallel": True,
        "rollout.sglang_tp": 4,
        "rollout.max_new_tokens": 8192,
        "train.max_tokens_per_microbatch": 10240,
    },
}

# algorithm row: what differs from the shared settings.
ALGORITHMS: dict[str, dict[str, Any]] = {
    "rlrt": {"alpha": 1.0, "eps_w": 0.2, "reward_gate": True, **CLIP},
    "grpo": {"agg": "seq-mean-token-mean", **CLIP},
    "dapo": {"agg": "token-mean", "dynamic_sampling": True, **CLIP},
    "rlsd": {"lam_init": 0.5, "lam_decay_steps": 50, "teacher_refresh_every": 10, **CLIP},
    "srpo": {
        "ema_rate": 0.05,
        "topk": 100,
        "beta": 0.5,
        "entropy_beta": 1.0,
        "scale_by_std": False,
        **CLIP,
    },  # fmt: skip
    "sdpo": {"ema_rate": 0.05, "topk": 100, "beta": 0.5, "is_clip": 2.0},
}


# What an algorithm's own paper changes in the shared settings (README "Recipes and sources").
# SDPO (Hubotter et al. 2026, its public code): lr 1e-5, one optimizer update per step, top-k 100,
# EMA teacher 0.05, JSD interpolation 0.5, truncated IS cap 2 (PAPER's rollout correction).
# SRPO (Li et al. 2026, arXiv 2604.02288): lr 5e-6, entropy weight beta_H = 1, unbiased GRPO.
ALGORITHM_SHARED: dict[str, dict[str, Any]] = {
    "sdpo": {"optimizer.lr": 1e-5, "train.mini_batch_prompts": PAPER["train.prompts_per_step"]},
    "srpo": {"optimizer.lr": 5e-6},
}


def algorithm_row(algo: str) -> dict[str, Any]:
    """The dotted overrides selecting `algo` with its row of settings."""
    return {
        "algorithm.name": algo,
        **{f"algorithm.{algo}.{k}": v for k, v in ALGORITHMS[algo].items()},
    }


def _paper_recipe(model: str, algo: str) -> Callable[[], TrainConfig]:
    def build() -> TrainConfig:
        cfg = TrainConfig(name=f"{model}_{algo}")
        apply_overrides(
            cfg,
            {**PAPER, **MODELS[model], **algorithm_row(algo), **ALGORITHM_SHARED.get(algo, {})},
        )
        return cfg

    build.__name__ = f"{model}_{algo}"
    build.__doc__ = f"{model} with {algo} and the paper's settings on 8xH100 nodes."
    return build


for _model in MODELS:
    for _algo in ALGORITHMS:
        register_recipe(f"{_model}_{_algo}")(_paper_recipe(_model, _algo))


# The CPU demo: tiny random Qwen3, SFT-warmed on the synthetic arithmetic task.
TINY = {
    "model.build_tiny": True,
    # half of the warm-up in the teacher format, so the teacher reads its context (issue 23):
    # measured teacher 0.844 vs student 0.260 (64 held-out problems x 8 samples; the student
    # near the 0.24-0.27 of the former 300 student-only steps)
    "model.sft_warmup_steps": 340,
    "model.sft_teacher_frac": 0.5,
    "model.spec": "local",
    "model.params_dtype": "auto",
    "parallel.tp": 1,
    "parallel.pp": 1,
    "rollout.engine": "local",
    "rollout.group_size": 8,
    "rollout.max_new_tokens": 40,
    "rollout.temperature": 1.0,
    "train.steps": 100,
    "train.prompts_per_step": 64,
    "train.mini_batch_prompts": 16,
    "train.max_tokens_per_microbatch": 2048,
    "optimizer.lr": 2e-4,
    "optimizer.weight_decay": 0.0,
    "data.path": "synthetic",
    "data.synthetic_size": 2048,
    "data.synthetic_max_operand": 9,
    "data.instruction": "",
    "data.max_prompt_tokens": 128,
    "checkpoint.save_every": 0,
    "checkpoint.keep_last": 2,
    "logging.tensorboard": True,
    "eval.every": 10,
    "eval.datasets": ["synthetic"],
    "eval.k": 8,
}


# The tiny runs are short: faster teacher refresh / EMA, fewer top-k ids; GRPO with RLRT's
# aggregation so `rlrt demo --compare` contrasts only the token weights.
TINY_ALGORITHMS: dict[str, dict[str, Any]] = {
    "grpo": {"algorithm.grpo.agg": "token-mean"},
    "rlsd": {"algorithm.rlsd.teacher_refresh_every": 5, "algorithm.rlsd.lam_decay_steps": 30},
    "srpo": {"algorithm.srpo.topk": 16, "algorithm.srpo.ema_rate": 0.2},
    # SDPO distils on every rollout with a peer: 2e-4 (the PPO algorithms' lr) overshoots, and at
    # 2e-5 with four updates per step (mini-batches of 16 prompts) it drifted down over 100 steps
    # (reward 0.25 -> 0.17 on 3/3 seeds): its source's lr 1e-5 and one update per step
    "sdpo": {
        "algorithm.sdpo.topk": 16,
        "algorithm.sdpo.ema_rate": 0.2,
        "optimizer.lr": 1e-5,
        "train.mini_batch_prompts": TINY["train.prompts_per_step"],
    },
}


def _tiny_recipe(algo: str) -> Callable[[], TrainConfig]:
    def build() -> TrainConfig:
        cfg = TrainConfig(name="tiny_demo" if algo == "rlrt" else f"tiny_demo_{algo}")
        apply_overrides(cfg, {**TINY, **algorithm_row(algo), **TINY_ALGORITHMS.get(algo, {})})
        return cfg

    build.__name__ = cfg_name = "tiny_demo" if algo == "rlrt" else f"tiny_demo_{algo}"
    build.__doc__ = f"CPU demo ({cfg_name}): tiny Qwen3, synthetic arithmetic, {algo}."
    return build


for _algo in ALGORITHMS:
    _fn = _tiny_recipe(_algo)
    register_recipe(_fn.__name__)(_fn)

tiny_demo = _RECIPES["tiny_demo"]
