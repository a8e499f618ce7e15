"""The smaller sections of `TrainConfig` (FP8, MoE, checkpoint, logging, timeouts, eval,
teacher) and the field helpers every section uses; `schema.py` holds the rest and the
validation. One dataclass per section, each field with its default and meaning."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its documentation."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _sub(cls: type) -> Any:
    return field(default_factory=cls, metadata={"help": cls.__doc__.splitlines()[0]})


@dataclass
class FP8Settings:
    """FP8 training of the transformer layers (needs model.spec=te; default off)."""

    enabled: bool = _f(False, "Run the transformer layers' GEMMs in FP8 (needs model.spec=te).")
    format: Literal["hybrid", "e4m3"] = _f(
        "hybrid", "`hybrid` = E4M3 forward, E5M2 gradients; `e4m3` = E4M3 for both."
    )
    recipe: Literal["delayed", "current", "tensorwise", "blockwise", "mxfp8"] = _f(
        "delayed",
        "Scaling recipe: `delayed` (amax history), `current`/`tensorwise` (per-tensor, "
        "TE >= 2.2), `blockwise` (Hopper, TE >= 2.3) or `mxfp8` (Blackwell).",
    )
    amax_history_len: int = _f(1024, "Delayed scaling: length of the amax history.")
    amax_compute_algo: Literal["max", "most_recent"] = _f(
        "max", "Delayed scaling: scale from the history's `max` or `most_recent` amax."
    )
    margin: int = _f(0, "Scaling margin (power-of-two exponent) of the FP8 scale.")
    fp8_param: bool = _f(
        False, "Keep GEMM weights in FP8 (off: RL pushes exact bf16 weights to the rollouts)."
    )
    wgrad: bool = _f(True, "Compute weight gradients in FP8 too (false: bf16 wgrad GEMMs).")

    def to_te(self) -> Any:
        """The `rlrt_megatron.megatron.te.FP8Config` of these settings."""
        from rlrt_megatron.megatron.te import FP8Config

        return FP8Config(**dataclasses.asdict(self))


@dataclass
class MoEConfig:
    """Mixture-of-experts (Qwen3-MoE) routers in the trainer; ignored for dense models."""

    aux_loss_coeff: float = _f(
        0.0, "Router load-balancing (aux) loss coefficient; 0 = off (RL default, as peers)."
    )
    expert_bias: bool = _f(
        False, "Aux-loss-free expert bias (needs a sigmoid router; Qwen3-MoE's is softmax)."
    )
    dispatcher: Literal["alltoall", "allgather"] = _f(
        "alltoall", "Megatron token dispatcher across expert-parallel ranks."
    )
    routing_replay: Literal["off", "rollout"] = _f(
        "off",
        "`rollout`: the trainer's forward routes each response token to the experts the rollout "
        "engine chose (recorded per layer, top-k), the router still trained through the gate "
        "values (R3; recorded by the local engine or SGLang's return_routed_experts; not with "
        "partial rollouts); `off`: the trainer routes itself.",
    )


@dataclass
class CheckpointConfig:
    """Checkpoints: where, how often, resume."""

    dir: str = _f("", "Checkpoint directory (empty = `<run_dir>/checkpoints`).")
    save_every: int = _f(50, "Save every N steps (0 = only on signal / at the end).")
    keep_last: int = _f(2, "Keep the newest N checkpoints (0 = keep all).")
    save_final: bool = _f(True, "Save after the last step.")
    resume: str = _f("auto", "`auto` (latest if any), `none`, or a checkpoint path.")


@dataclass
class LoggingConfig:
    """Run directory and metric sinks."""

    run_dir: str = _f("", "Run directory (empty = `runs/<name>`).")
    jsonl: bool = _f(True, "Write one json line of metrics per step to `<run_dir>/metrics.jsonl`.")
    tensorboard: bool = _f(True, "Write TensorBoard scalars to `<run_dir>/tb`.")
    wandb_project: str = _f("", "Weights & Biases project (empty = off; needs the wandb extra).")
    console: Literal["rich", "plain", "none"] = _f("rich", "Console output: progress bar or lines.")


@dataclass
class TimeoutsConfig:
    """Per-phase timeouts in seconds: on expiry every rank dumps its stacks and exits non-zero."""

    init: float = _f(1800.0, "Model build, weight load, engine start.")
    rollout: float = _f(3600.0, "Sampling one batch.")
    reward: float = _f(600.0, "Scoring one batch.")
    reward_per_sample: float = _f(10.0, "math-verify wall-clock limit per sample (scores 0).")
    logprobs: float = _f(1800.0, "Student/teacher log-prob forwards.")
    advantages: float = _f(300.0, "Advantage computation.")
    update: float = _f(3600.0, "All mini-batch updates of one step.")
    sync: float = _f(900.0, "Pushing weights to the rollout engine.")
    checkpoint: float = _f(1800.0, "Saving or loading a checkpoint.")
    log: float = _f(300.0, "Metric logging.")
    eval: float = _f(3600.0, "One in-training evaluation.")


@dataclass
class EvalConfig:
    """Periodic evaluation (avg@k on local benchmark files)."""

    every: int = _f(0, "Evaluate every N steps (0 = off).")
    datasets: list[str] = _f(
        [],
        "Benchmarks: `synthetic` (built in) or NAME=PATH (problem/answer jsonl/parquet), "
        "comma-separated; empty = no in-training eval.",
    )
    k: int = _f(4, "Samples per problem (avg@k, pass@k).")
    max_new_tokens: int = _f(0, "Response limit for eval (0 = rollout.max_new_tokens).")


@dataclass
class TeacherConfig:
    """Teacher diagnostics (algorithms with a teacher: RLRT, RLSD, SDPO, SRPO)."""

    probe_rows: int = _f(
        16,
        "Rollouts per step the algorithm does not use (RLRT: wrong ones; SRPO: correct ones) "
        "that still get a teacher forward, for `delta/correct_mean` vs `delta/wrong_mean` only.",
    )
    warn_gap: float = _f(
        0.05,
        "Warn when `delta/gap` (= delta/correct_mean - delta/wrong_mean) stays below this for "
        "`warn_steps` steps in a row: the teacher does not tell right from wrong rollouts.",
    )
    warn_steps: int = _f(5, "Consecutive steps below `warn_gap` before the warning (0 = off).")
    eval_probe: bool = _f(
        True,
        "With eval: `eval/teacher/<bench>/avg@k` = accuracy of the teacher prompt showing a "
        "correct solution of the same problem taken from the eval's own samples.",
    )
