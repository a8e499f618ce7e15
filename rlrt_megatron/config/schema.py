"""The schema of `TrainConfig`: one dataclass per section, each field with its default and
meaning (`metadata["help"]`; the smaller sections live in `sections.py`), `validation_errors`
(every problem, each naming its dotted key and the fix) and the json dump. The package
docstring (`config/__init__.py`) says how it is used."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from rlrt_megatron.algorithms import ALGORITHMS, AlgorithmConfig
from rlrt_megatron.config.overrides import ConfigError, _from_dict, apply_overrides
from rlrt_megatron.config.sections import (
    CheckpointConfig,
    EvalConfig,
    FP8Settings,
    LoggingConfig,
    MoEConfig,
    TeacherConfig,
    TimeoutsConfig,
    _f,
    _sub,
)

ALGORITHM_NAMES = tuple(ALGORITHMS)
# Algorithms whose advantage is a group baseline: a group of one rollout has zero advantage.
GROUP_ALGORITHMS = ("grpo", "dapo", "rlrt", "rlsd", "srpo")

DEFAULT_TEACHER_TEMPLATE = (
    "{prompt}\nCorrect solution:\n\n{peer_solution}\n\nCorrectly solve the original question.\n"
)
DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# Config keys holding secrets: `TrainConfig.to_dict` (config.json, checkpoints, metrics loggers,
# printed configs) writes them as REDACTED.
SECRET_KEYS = ("rollout.sglang_api_key",)
REDACTED = "<redacted>"


@dataclass
class ModelConfig:
    """The policy model: where its weights come from and how Megatron builds it."""

    hf_path: str = _f(
        "",
        "Hugging Face model directory (config.json, tokenizer, safetensors). Empty with "
        "`build_tiny=True`: the tiny random Qwen3 is built under `<run_dir>/model/hf`.",
    )
    megatron_ckpt: str = _f(
        "",
        "Megatron distributed checkpoint holding the initial weights (`rlrt convert "
        "hf-to-megatron`). Empty: converted from `hf_path` into `<run_dir>/model/megatron`.",
    )
    build_tiny: bool = _f(False, "Build the tiny random Qwen3 + tokenizer (CPU demo and tests).")
    tiny_arch: Literal["qwen3", "qwen3_moe"] = _f(
        "qwen3", "Architecture of the tiny model: dense Qwen3 or Qwen3-MoE (8 experts, top-2)."
    )
    sft_warmup_steps: int = _f(
        0,
        "Next-token training steps on synthetic solutions before RL (tiny demo: rewards must "
        "not all be zero). Cached under the run dir.",
    )
    sft_lr: float = _f(3e-3, "Learning rate of the SFT warm-up.")
    sft_teacher_frac: float = _f(
        0.0,
        "Share of SFT warm-up examples rendered with the teacher template (`data.teacher_template`"
        " showing a correct solution of the same problem) instead of the student prompt, so the "
        "warmed model can read its privileged context: the teacher of RLRT/RLSD/SDPO/SRPO is then "
        "more accurate than the student. The warm-up prints both accuracies.",
    )
    spec: Literal["auto", "local", "torch", "te"] = _f(
        "auto",
        "Layer spec: `local` (Megatron's pure PyTorch modules, dense attention; CPU), `torch` "
        "(PyTorch SDPA flash attention, packed rows; GPUs without TE), `te` (Transformer "
        "Engine, GPU; needed for FP8). `auto`: te with TE and a GPU, torch on a GPU without "
        "TE, local on CPU (resolved where the model is built).",
    )
    params_dtype: Literal["auto", "float32", "bfloat16"] = _f(
        "float32",
        "Parameter/compute dtype of the Megatron policy; bfloat16 keeps fp32 main params and "
        "gradients in Megatron's optimizer/DDP. `auto` = bfloat16 on a GPU, float32 on CPU.",
    )
    fp8: FP8Settings = _sub(FP8Settings)
    moe: MoEConfig = _sub(MoEConfig)
    logprobs_impl: Literal["auto", "fused", "chunked", "naive"] = _f(
        "auto",
        "LM head + log-probs from hidden states (student, teacher, update; no [tokens, vocab] "
        "logits): `fused` (Triton kernels, CUDA), `chunked` (torch, any device; the reference), "
        "`naive` (full fp32 logits, for comparison only), `auto` (fused on CUDA, else chunked).",
    )


@dataclass
class ParallelConfig:
    """Model parallel sizes; data parallel = world size / (tp * pp)."""

    tp: int = _f(1, "Tensor model parallel size; must divide the attention and KV heads.")
    pp: int = _f(1, "Pipeline model parallel size; must divide the number of layers.")
    sequence_parallel: bool = _f(False, "Megatron sequence parallelism (needs tp > 1).")
    ep: int = _f(1, "Expert parallel size (MoE models); must divide the number of experts.")
    etp: int = _f(0, "Expert tensor parallel size (MoE); 0 = parallel.tp.")
    use_distributed_optimizer: bool = _f(
        True, "Shard optimizer state over data-parallel ranks (Megatron distributed optimizer)."
    )


@dataclass
class RolloutConfig:
    """Sampling: the rollout engine and its settings."""

    engine: Literal["local", "sglang"] = _f(
        "local", "`local`: transformers on rank 0 (CPU, tests, demo); `sglang`: SGLang servers."
    )
    local_dtype: Literal["auto", "float32", "bfloat16"] = _f(
        "auto", "Local engine dtype; `auto` = bfloat16 on a GPU, float32 on CPU."
    )
    local_max_batch_rows: int = _f(
        0, "Local engine: rows decoded together (0 = auto: 512 on a GPU, 64 on CPU)."
    )
    group_size: int = _f(8, "Rollouts per prompt (G).")
    temperature: float = _f(1.0, "Sampling temperature.")
    top_p: float = _f(1.0, "Nucleus sampling threshold (1.0 = off).")
    top_k: int = _f(-1, "Top-k sampling (-1 = off).")
    max_new_tokens: int = _f(1024, "Maximum response length in tokens.")
    seed: int = _f(0, "Base sampling seed; step s samples with seed + s so a resume reproduces it.")
    sglang_tp: int = _f(1, "Tensor parallel size of each SGLang server.")
    sglang_mem_fraction: float = _f(0.6, "SGLang `mem_fraction_static`.")
    sglang_num_servers: int = _f(0, "SGLang servers (0 = one per node's GPUs / sglang_tp).")
    sglang_urls: list[str] = _f(
        [], "Running SGLang servers to connect to (comma-separated); empty = launch our own."
    )
    sglang_host: str = _f("127.0.0.1", "Address launched servers bind to.")
    sglang_api_key: str = _f(
        "",
        "Server API key; empty = $RLRT_ROLLOUT_API_KEY (prefer it: an override shows in `ps`). "
        "Written as <redacted> wherever the config is saved or logged.",
    )
    sglang_colocated: bool = _f(True, "Servers share the trainer's GPUs (tensor weight sync).")
    sglang_sync_mode: str = _f("", "Weight sync: tensor | distributed | disk (empty = auto).")
    sglang_bucket_mb: int = _f(512, "Weight-sync bucket size in MiB.")
    sglang_sync_dir: str = _f("", "Directory for disk weight sync (empty = <run_dir>/weight_sync).")
    sglang_verify_stride: int = _f(0, "Check every N-th synced tensor on the server (0 = off).")
    sglang_restart_cache: bool = _f(True, "Flush the server's prefix cache after a weight sync.")
    sglang_master_address: str = _f("", "Rendezvous address for distributed weight sync.")
    sglang_extra_args: list[str] = _f([], "Extra `sglang.launch_server` arguments.")
    sglang_python: str = _f(
        "",
        "Interpreter that launches the servers (empty = this one, e.g. a GPU container with "
        "SGLang installed; /opt/venv-sglang/bin/python after `make sglang-env`).",
    )
    sglang_dtype: str = _f(
        "bfloat16", "Servers' `--dtype` (float32 on CPU; the sync check's tolerance follows it)."
    )
    max_staleness: int = _f(
        0,
        "Bounded staleness K: the engine may run up to K weight versions ahead of the batch the "
        "trainer trains on (batch k is sampled with the weights of step k-K-1 while steps k-K.. "
        "k-1 train). 0 = every step waits for its own rollouts (on-policy up to the engine's "
        "numerics). K >= 1 needs the local engine (run in its own process) or SGLang on "
        "separate rollout nodes (sglang_colocated=false).",
    )
    async_steps: int = _f(
        0,
        "Alias of max_staleness kept for old configs: async_steps=1 is max_staleness=1 (set one "
        "of the two).",
    )
    partial: bool = _f(
        False,
        "Partial rollouts (needs max_staleness >= 1; local engine, or SGLang by abort + "
        "continue): a step trains on the first "
        "groups to finish; unfinished generations are interrupted at each weight push and "
        "resumed under the new weights from their partial tokens (every token keeps the version "
        "that sampled it); a group whose oldest token is more than max_staleness versions "
        "behind the trainer is regenerated from scratch (counted in rollout/partial_restarted).",
    )
    local_length_tail: bool = _f(
        False,
        "Benchmark workload (local engine): each rollout is exactly as long as a heavy-tailed "
        "length drawn from its seed (80% up to max_new_tokens/8, 15% up to /2, 5% at the "
        "limit): eos is not drawn before it, and it stops there.",
    )
    local_process: bool = _f(
        False, "Run the local engine in its own process (always on with max_staleness >= 1)."
    )
    sync_check_tol: float = _f(
        0.0,
        "Sync check: the step fails when the mean |engine - trainer| log-prob of the same tokens "
        "under the same weights version exceeds this. 0 = per-dtype default: 1e-3 when engine "
        "and trainer both run fp32, 0.1 when either runs bf16; < 0 = off.",
    )

    @property
    def staleness(self) -> int:
        """The staleness bound K in force: max_staleness, or its alias async_steps."""
        return int(self.max_staleness or self.async_steps)


@dataclass
class DataConfig:
    """Prompt data and teacher-context templates."""

    path: str = _f(
        "synthetic",
        "jsonl / parquet file or `datasets` save directory; `synthetic` = the arithmetic task.",
    )
    prompt_key: str = _f("problem", "Field with the question (a string or a chat list).")
    answer_key: str = _f("answer", "Field with the reference answer.")
    solution_key: str = _f("solution", "Optional field with a worked solution (RLSD teacher).")
    on_bad_row: Literal["error", "skip"] = _f(
        "error", "A row with a missing/empty/mistyped field: raise naming file and row, or skip."
    )
    synthetic_size: int = _f(4096, "Number of synthetic problems (path=synthetic).")
    synthetic_max_operand: int = _f(9, "Largest operand of synthetic problems.")
    instruction: str = _f(DEFAULT_INSTRUCTION, "Appended to each question (empty = none).")
    teacher_template: str = _f(
        DEFAULT_TEACHER_TEMPLATE,
        "Teacher prompt for RLRT/SDPO/SRPO (`{prompt}`, `{peer_solution}`) and RLSD "
        "(`{peer_solution}` = the reference solution/answer).",
    )
    max_prompt_tokens: int = _f(1024, "Prompts longer than this are skipped (counted in logs).")
    max_teacher_prompt_tokens: int = _f(
        0,
        "A teacher prompt (template + prompt + peer solution) longer than this gives that "
        "rollout no teacher. 0 = max_prompt_tokens + rollout.max_new_tokens + 64.",
    )
    shuffle: bool = _f(True, "Shuffle prompts each epoch (seeded by train.seed).")


@dataclass
class TrainLoopConfig:
    """The RL loop: steps, batch sizes, micro-batching."""

    steps: int = _f(100, "Number of RL steps (one rollout batch each).")
    prompts_per_step: int = _f(256, "Prompts per step (the rollout batch is this x group_size).")
    mini_batch_prompts: int = _f(
        128, "Prompts per PPO mini-batch (one optimizer step each); divides prompts_per_step."
    )
    ppo_epochs: int = _f(1, "Passes over the rollout batch.")
    max_tokens_per_microbatch: int = _f(
        16384, "Token budget of one micro-batch (prompt + response tokens, packed greedily)."
    )
    seed: int = _f(1234, "Seed of data order, model init and dropout.")
    balance_dp: bool = _f(
        True,
        "Split each mini-batch over data-parallel ranks by tokens (greedy largest-first) so no "
        "rank waits for the one holding the long rollouts; false = by position. Same loss and "
        "gradients either way (the token-mean is over the whole mini-batch); no-op at DP=1.",
    )
    recompute_old_logprobs: bool = _f(
        True, "Old log-probs from the Megatron policy (True) or the engine's behavior log-probs."
    )
    on_nonfinite: Literal["skip", "stop"] = _f(
        "skip",
        "A NaN / Inf loss or gradient in a mini-batch: `skip` its optimizer step (counted as "
        "`update/nonfinite_skipped`) or `stop` the run naming the step and the tensor (exit 5). "
        "The weights never take a non-finite update, so no checkpoint holds one.",
    )
    deterministic: bool = _f(
        False,
        "Deterministic GPU kernels (slower): a rerun or resumed run reproduces the metrics bit "
        "for bit on GPUs too. CPU runs are deterministic anyway.",
    )


@dataclass
class OptimizerConfig:
    """Adam via Megatron's `get_megatron_optimizer`."""

    lr: float = _f(1e-6, "Peak learning rate.")
    min_lr: float = _f(0.0, "Final learning rate of the cosine schedule.")
    schedule: Literal["constant", "cosine"] = _f("constant", "Learning-rate schedule after warmup.")
    warmup_steps: int = _f(0, "Linear warmup optimizer steps.")
    weight_decay: float = _f(0.01, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.999, "Adam beta2.")
    adam_eps: float = _f(1e-8, "Adam epsilon.")
    clip_grad: float = _f(1.0, "Global gradient-norm clip (0 = off).")


@dataclass
class TrainConfig:
    """A full training run."""

    name: str = _f("run", "Run name (run directory, logs).")
    model: ModelConfig = _sub(ModelConfig)
    parallel: ParallelConfig = _sub(ParallelConfig)
    rollout: RolloutConfig = _sub(RolloutConfig)
    algorithm: AlgorithmConfig = field(
        default_factory=AlgorithmConfig,
        metadata={"help": "The RL algorithm (rlrt_megatron.algorithms.AlgorithmConfig)."},
    )
    data: DataConfig = _sub(DataConfig)
    train: TrainLoopConfig = _sub(TrainLoopConfig)
    optimizer: OptimizerConfig = _sub(OptimizerConfig)
    checkpoint: CheckpointConfig = _sub(CheckpointConfig)
    logging: LoggingConfig = _sub(LoggingConfig)
    timeouts: TimeoutsConfig = _sub(TimeoutsConfig)
    eval: EvalConfig = _sub(EvalConfig)
    teacher: TeacherConfig = _sub(TeacherConfig)

    # ---- derived paths -------------------------------------------------------------------
    @property
    def run_dir(self) -> str:
        return self.logging.run_dir or os.path.join("runs", self.name)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")

    # ---- validation ----------------------------------------------------------------------
    def validate(self, hf_config: dict | None = None, world_size: int | None = None) -> TrainConfig:
        """Check every value; raise `ConfigError` naming the dotted key and the fix.

        `hf_config` (the model's config.json as a dict) enables the head/layer divisibility
        checks; `world_size` the data-parallel ones. Returns self for chaining.
        """
        errors = validation_errors(self, hf_config, world_size)
        if errors:
            raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
        return self

    def to_dict(self, redact: bool = True) -> dict:
        """The config as plain data; every secret (SECRET_KEYS) set is written as REDACTED, so
        config.json, checkpoints, TensorBoard/wandb and printed configs never hold it."""
        d = dataclasses.asdict(self)
        if redact:
            for dotted in SECRET_KEYS:
                section, key = dotted.split(".")
                if d[section].get(key):
                    d[section][key] = REDACTED
        return d

    def to_json(self, path: str | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False)
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write(text + "\n")
            os.replace(tmp, path)
        return text

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return _from_dict(cls, d, "")

    def override(self, overrides: list[str] | dict[str, Any]) -> TrainConfig:
        """Apply dotted overrides in place (see `apply_overrides`); returns self."""
        apply_overrides(self, overrides)
        return self


def validation_errors(
    cfg: TrainConfig, hf_config: dict | None = None, world_size: int | None = None
) -> list[str]:
    """All problems of `cfg`, one message each, starting with the dotted key."""
    e: list[str] = []

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            e.append(f"{key}: {msg}")

    o, t, r, a, p = cfg.optimizer, cfg.train, cfg.rollout, cfg.algorithm, cfg.parallel
    need(o.lr > 0, "optimizer.lr", f"must be > 0 (got {o.lr}); e.g. optimizer.lr=1e-6")
    need(
        0 <= o.min_lr <= o.lr, "optimizer.min_lr", f"must be in [0, optimizer.lr] (got {o.min_lr})"
    )
    need(o.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0 (got {o.weight_decay})")
    need(o.warmup_steps >= 0, "optimizer.warmup_steps", f"must be >= 0 (got {o.warmup_steps})")
    need(0 <= o.adam_beta1 < 1, "optimizer.adam_beta1", f"must be in [0, 1) (got {o.adam_beta1})")
    need(0 <= o.adam_beta2 < 1, "optimizer.adam_beta2", f"must be in [0, 1) (got {o.adam_beta2})")
    need(o.clip_grad >= 0, "optimizer.clip_grad", f"must be >= 0 (got {o.clip_grad})")
    need(a.name in ALGORITHM_NAMES, "algorithm.name", f"must be one of {ALGORITHM_NAMES}")
    need(r.group_size >= 1, "rollout.group_size", f"must be >= 1 (got {r.group_size})")
    if a.name in GROUP_ALGORITHMS or a.name == "sdpo":
        need(
            r.group_size >= 2,
            "rollout.group_size",
            f"{a.name} compares rollouts within a group: group_size must be >= 2 "
            f"(got {r.group_size}); e.g. rollout.group_size=8",
        )
    need(r.temperature > 0, "rollout.temperature", f"must be > 0 (got {r.temperature})")
    need(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1] (got {r.top_p})")
    need(r.max_new_tokens >= 1, "rollout.max_new_tokens", f"must be >= 1 (got {r.max_new_tokens})")
    need(r.engine in ("local", "sglang"), "rollout.engine", "must be `local` or `sglang`")
    need(r.local_max_batch_rows >= 0, "rollout.local_max_batch_rows", "must be >= 0 (0 = auto)")
    need(r.async_steps in (0, 1), "rollout.async_steps", f"must be 0 or 1 (got {r.async_steps})")
    need(r.max_staleness >= 0, "rollout.max_staleness", f"must be >= 0 (got {r.max_staleness})")
    need(
        not (r.async_steps and r.max_staleness not in (0, r.async_steps)),
        "rollout.async_steps",
        f"is an alias of rollout.max_staleness (async_steps=1 is max_staleness=1) and disagrees "
        f"with max_staleness={r.max_staleness}: drop rollout.async_steps",
    )
    need(
        not (r.staleness and r.engine == "sglang" and r.sglang_colocated),
        "rollout.max_staleness",
        "colocated SGLang servers share the trainer's GPUs and hand them back for every update, "
        "so they cannot generate while it trains: use rollout.max_staleness=0, or SGLang on "
        "separate rollout nodes (rollout.sglang_colocated=false, rollout.sglang_urls=...)",
    )
    need(
        not r.partial or r.staleness >= 1,
        "rollout.partial",
        "needs rollout.max_staleness >= 1 (interrupted generations resume under newer weights; "
        "local engine, or SGLang by abort + continue)",
    )
    need(
        r.sync_check_tol == r.sync_check_tol, "rollout.sync_check_tol", "must be a number, not NaN"
    )
    need(
        r.sglang_dtype in ("bfloat16", "float16", "float32", "auto"),
        "rollout.sglang_dtype",
        f"must be bfloat16 | float16 | float32 | auto (got {r.sglang_dtype!r})",
    )
    for sub in dataclasses.fields(a):
        obj = getattr(a, sub.name)
        if dataclasses.is_dataclass(obj):
            try:  # the algorithm configs check themselves in __post_init__
                dataclasses.replace(obj)
            except ValueError as err:
                e.append(f"algorithm.{sub.name}: {err}")
    rc = a.rollout_correction
    need(
        rc.mode == "none" or t.recompute_old_logprobs,
        "algorithm.rollout_correction.mode",
        f"{rc.mode} with train.recompute_old_logprobs=false counts the trainer/engine mismatch "
        "twice: the old log-probs are then the engine's, so the PPO ratio pi / pi_old already "
        "spans the mismatch that the correction weight pi_trainer / pi_engine multiplies in "
        "again; use train.recompute_old_logprobs=true (PPO ratio against the trainer's "
        "recompute, the correction for the engine gap) or algorithm.rollout_correction.mode=none",
    )
    need(t.steps >= 0, "train.steps", f"must be >= 0 (got {t.steps})")
    need(t.prompts_per_step >= 1, "train.prompts_per_step", "must be >= 1")
    need(t.mini_batch_prompts >= 1, "train.mini_batch_prompts", "must be >= 1")
    if t.mini_batch_prompts >= 1 and t.prompts_per_step % t.mini_batch_prompts:
        e.append(
            f"train.mini_batch_prompts: must divide train.prompts_per_step "
            f"({t.mini_batch_prompts} does not divide {t.prompts_per_step})"
        )
    need(t.ppo_epochs >= 1, "train.ppo_epochs", "must be >= 1")
    need(
        t.max_tokens_per_microbatch >= 1,
        "train.max_tokens_per_microbatch",
        "must be >= 1",
    )
    need(p.tp >= 1, "parallel.tp", f"must be >= 1 (got {p.tp})")
    need(p.pp >= 1, "parallel.pp", f"must be >= 1 (got {p.pp})")
    need(not p.sequence_parallel or p.tp > 1, "parallel.sequence_parallel", "needs parallel.tp > 1")
    if world_size is not None and p.tp >= 1 and p.pp >= 1:
        mp = p.tp * p.pp
        if world_size % mp:
            e.append(
                f"parallel.tp: tp * pp = {mp} must divide the world size {world_size}; "
                "change parallel.tp / parallel.pp or the number of processes"
            )
        else:
            dp = world_size // mp
            rollouts = t.mini_batch_prompts * r.group_size
            if rollouts % dp:
                e.append(
                    f"train.mini_batch_prompts: a mini-batch of {rollouts} rollouts "
                    f"(mini_batch_prompts * group_size) must divide over data parallel {dp}"
                )
    if hf_config is not None and p.tp >= 1:
        heads = int(hf_config.get("num_attention_heads", 0) or 0)
        kv = int(hf_config.get("num_key_value_heads", heads) or heads)
        layers = int(hf_config.get("num_hidden_layers", 0) or 0)
        if heads and heads % p.tp:
            e.append(
                f"parallel.tp: {p.tp} does not divide the model's num_attention_heads={heads}; "
                f"use a divisor of {heads}"
            )
        if kv and kv % p.tp:
            e.append(
                f"parallel.tp: {p.tp} does not divide the model's num_key_value_heads={kv}; "
                f"use a divisor of {kv}"
            )
        if layers and p.pp >= 1 and layers % p.pp:
            e.append(f"parallel.pp: {p.pp} does not divide the model's num_hidden_layers={layers}")
    m = cfg.model
    need(
        bool(m.hf_path) or m.build_tiny,
        "model.hf_path",
        "is empty; give a Hugging Face model directory or set model.build_tiny=true",
    )
    need(m.sft_warmup_steps >= 0, "model.sft_warmup_steps", "must be >= 0")
    need(0.0 <= m.sft_teacher_frac <= 1.0, "model.sft_teacher_frac", "must be in [0, 1]")
    need(cfg.teacher.probe_rows >= 0, "teacher.probe_rows", "must be >= 0")
    need(cfg.teacher.warn_steps >= 0, "teacher.warn_steps", "must be >= 0")
    need(
        m.spec in ("auto", "local", "torch", "te"),
        "model.spec",
        f"is {m.spec!r}; must be `auto`, `local`, `torch` or `te`",
    )
    need(
        m.logprobs_impl in ("auto", "fused", "chunked", "naive"),
        "model.logprobs_impl",
        f"must be `auto`, `fused`, `chunked` or `naive`, got {m.logprobs_impl!r}",
    )
    need(
        not m.fp8.enabled or m.spec == "te",
        "model.fp8.enabled",
        f"FP8 requires model.spec=te (got model.spec={m.spec}): only Transformer Engine layers "
        "run FP8 GEMMs",
    )
    try:
        m.fp8.to_te().validate("te")  # the other FP8 fields (the spec is checked above)
    except ValueError as ex:
        e.append(f"model.{ex}")
    c = cfg.checkpoint
    need(c.save_every >= 0, "checkpoint.save_every", "must be >= 0")
    need(c.keep_last >= 0, "checkpoint.keep_last", "must be >= 0")
    need(c.resume != "", "checkpoint.resume", "must be `auto`, `none` or a path")
    need(cfg.data.on_bad_row in ("error", "skip"), "data.on_bad_row", "must be `error` or `skip`")
    need(cfg.train.on_nonfinite in ("skip", "stop"), "train.on_nonfinite", "must be skip or stop")
    if "{peer_solution}" not in cfg.data.teacher_template:
        e.append("data.teacher_template: must contain `{peer_solution}`")
    for f_ in dataclasses.fields(TimeoutsConfig):
        v = getattr(cfg.timeouts, f_.name)
        need(v > 0, f"timeouts.{f_.name}", f"must be > 0 seconds (got {v})")
    need(cfg.eval.every >= 0, "eval.every", "must be >= 0")
    e.extend(_moe_errors(cfg, hf_config, world_size))
    return e


def _moe_errors(cfg: TrainConfig, hf_config: dict | None, world_size: int | None) -> list[str]:
    """`parallel.ep` / `parallel.etp` / `model.moe` against the world size and the model."""
    p, moe, e = cfg.parallel, cfg.model.moe, []
    if p.ep < 1 or p.etp < 0:
        return [f"parallel.ep: must be >= 1 and parallel.etp >= 0 (got {p.ep}, {p.etp})"]
    expert_mp = p.pp * p.ep * (p.etp or p.tp)
    if world_size is not None and world_size % expert_mp:
        e.append(
            f"parallel.ep: pp * ep * etp = {expert_mp} must divide the world size {world_size}; "
            "change parallel.ep / parallel.etp or the number of processes"
        )
    if moe.aux_loss_coeff < 0:
        e.append(f"model.moe.aux_loss_coeff: must be >= 0 (got {moe.aux_loss_coeff})")
    if moe.expert_bias:
        e.append("model.moe.expert_bias: needs a sigmoid router; Qwen3-MoE routes with softmax")
    if moe.routing_replay == "rollout":
        # the engines record each token's experts while they sample (rollout/local.py, SGLang's
        # return_routed_experts); a partial rollout's tokens come from several calls
        if cfg.rollout.partial:
            e.append(
                "model.moe.routing_replay: `rollout` needs whole rollouts; set rollout.partial="
                "false (a partial rollout's experts come from several engine calls)"
            )
    if hf_config is None:
        return e
    n_exp = int(hf_config.get("num_experts") or hf_config.get("num_local_experts") or 0)
    if hf_config.get("model_type") != "qwen3_moe" or not n_exp:
        if p.ep > 1 or p.etp > 1:
            e.append(f"parallel.ep: {p.ep} (etp {p.etp}) needs a MoE model; this one is dense")
        if moe.routing_replay != "off":
            e.append("model.moe.routing_replay: needs a MoE model; set it to `off`")
        return e
    if n_exp % p.ep:
        e.append(f"parallel.ep: {p.ep} does not divide the model's num_experts={n_exp}")
    if p.tp > 1 and not p.sequence_parallel:
        e.append(
            f"parallel.sequence_parallel: megatron trains MoE layers with tp={p.tp} only with "
            "sequence parallelism; set it to true, or use parallel.ep instead of tp"
        )
    return e
