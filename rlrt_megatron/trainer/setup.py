"""Setup and teardown of a training run: distributed init, the model files (tiny model, SFT
warm-up, conversion), policy, optimizer, teacher copy, data, rollout engine and reward workers,
and resuming from a checkpoint (`trainer/train.py` calls `setup` then runs the phases of
`trainer/steps.py`)."""

from __future__ import annotations

import os
import random
from typing import Any

import torch
import torch.distributed as dist

from rlrt_megatron.config import TrainConfig, load_hf_config
from rlrt_megatron.platform import resolve_dtype
from rlrt_megatron.trainer.checkpoint import Checkpointer, layout_of
from rlrt_megatron.trainer.ckpt_manifest import resolve_verified
from rlrt_megatron.trainer.metrics import MetricsLogger
from rlrt_megatron.trainer.state import ROLLOUT_QUEUE_FILE, Run
from rlrt_megatron.trainer.steps import push_weights
from rlrt_megatron.trainer.watchdog import Watchdog


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def prepare_model_files(cfg: TrainConfig, log: Any = print) -> tuple[str, str]:
    """(hf_dir, megatron_ckpt) for the run; builds the tiny model, SFT-warms and converts it on
    rank 0 when the config asks (cached under `<run_dir>/model/`).

    Every rank derives the same paths from the config. Rank 0 alone does the work while the
    others wait: the conversion's checkpoint save is collective, so inside a multi-rank job
    `hf_to_megatron` runs in a 1-rank child process. A failure on rank 0 is sent to the other
    ranks, which raise too instead of waiting forever.
    """
    model_dir = os.path.join(cfg.run_dir, "model")
    hf_dir = cfg.model.hf_path
    if cfg.model.build_tiny and not hf_dir:
        hf_dir = os.path.join(model_dir, "hf")
    ckpt = cfg.model.megatron_ckpt or os.path.join(model_dir, "megatron")
    failure: BaseException | None = None
    if _is_rank0():
        try:
            if cfg.model.build_tiny and not cfg.model.hf_path:
                from rlrt_megatron.trainer.warmup import build_warm_tiny_model

                build_warm_tiny_model(hf_dir, cfg, log=log)
            if not cfg.model.megatron_ckpt and not os.path.isdir(ckpt):
                from rlrt_megatron.convert.hf_to_megatron import hf_to_megatron

                hf_to_megatron(hf_dir, ckpt, spec=cfg.model.spec, show_progress=False)
        except BaseException as ex:
            failure = ex
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [None if failure is None else f"{type(failure).__name__}: {failure}"]
        dist.broadcast_object_list(box, src=0)  # also the barrier after rank 0's work
        if failure is None and box[0] is not None:
            raise RuntimeError(f"rank 0 failed to prepare the model files: {box[0]}")
    if failure is not None:
        raise failure
    return hf_dir, ckpt


def preflight(cfg: TrainConfig) -> None:
    """Every config check that needs no work: values, the model's heads/layers (config.json, or
    the tiny model's known shape) and the world size from the launcher's environment."""
    hf_config = load_hf_config(cfg.model.hf_path)
    if hf_config is None and cfg.model.build_tiny:
        from rlrt_megatron.convert.tiny import tiny_config

        hf_config = tiny_config(cfg.model.tiny_arch).to_dict()
    world = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or "1"
    cfg.validate(hf_config=hf_config, world_size=int(world))


def setup(cfg: TrainConfig) -> Run:
    from rlrt_megatron import platform

    preflight(cfg)
    if cfg.train.deterministic:
        platform.set_deterministic()
    p = cfg.parallel
    info = platform.init_distributed(
        p.tp, p.pp, seed=cfg.train.seed, ep=p.ep, etp=p.etp or None
    )  # fmt: skip
    random.seed(cfg.train.seed)
    run_dir = cfg.run_dir
    if info.rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        cfg.to_json(os.path.join(run_dir, "config.json"))
    wd = Watchdog(cfg.timeouts, rank=info.rank, log_dir=os.path.join(run_dir, "logs"))
    with wd.phase("init"):
        hf_dir, ckpt = prepare_model_files(cfg)
        hf_config = load_hf_config(hf_dir)
        cfg.validate(hf_config=hf_config, world_size=info.world_size)
        run = _build(cfg, info, hf_dir, ckpt, hf_config, wd)
    from rlrt_megatron.config.warnings import config_warnings

    for w in config_warnings(cfg):  # once per run, on the rank that logs
        run.logger.message(f"warning: {w}")
    return run


def _build(cfg: TrainConfig, info: Any, hf_dir: str, ckpt: str, hf_config: dict, wd: Watchdog):
    from transformers import AutoTokenizer

    from rlrt_megatron.algorithms import get_algorithm
    from rlrt_megatron.convert.load import load_checkpoint_into_model
    from rlrt_megatron.data import PromptSampler, PromptTemplate
    from rlrt_megatron.data.templates import filter_by_prompt_length
    from rlrt_megatron.megatron.moe.provider import moe_settings
    from rlrt_megatron.megatron.train_step import Policy

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    algo = get_algorithm(cfg.algorithm.name, cfg.algorithm)
    updates_per_step = cfg.train.ppo_epochs * (
        cfg.train.prompts_per_step // cfg.train.mini_batch_prompts
    )
    policy = Policy(
        hf_config,
        tp=cfg.parallel.tp,
        pp=cfg.parallel.pp,
        optim=cfg.optimizer,
        total_steps=cfg.train.steps * updates_per_step,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        spec=cfg.model.spec,
        params_dtype=resolve_dtype(cfg.model.params_dtype),
        sample_vocab_size=len(tokenizer) if cfg.rollout.engine == "local" else None,
        fp8=cfg.model.fp8.to_te(),
        logprobs_impl=cfg.model.logprobs_impl,
        temperature=cfg.rollout.temperature,
        moe=moe_settings(cfg.model.moe),
        sequence_parallel=cfg.parallel.sequence_parallel,
    )
    load_checkpoint_into_model(policy.chunks, ckpt)
    policy.sync_main_params()  # bf16: the optimizer's fp32 main params follow the loaded weights
    teacher = None
    if algo.teacher_weights in ("snapshot", "ema"):  # the EMA accumulates in fp32
        teacher = policy.make_teacher_copy(torch.float32 if algo.teacher_weights == "ema" else None)
    template = PromptTemplate(instruction=cfg.data.instruction)
    dataset, n_too_long = filter_by_prompt_length(
        load_dataset(cfg), tokenizer, cfg.data.max_prompt_tokens, template, cfg.data.on_bad_row
    )
    sampler = PromptSampler(
        dataset, cfg.train.prompts_per_step, seed=cfg.train.seed, shuffle=cfg.data.shuffle
    )
    checkpointer = Checkpointer(
        cfg.checkpoint_dir, keep_last=cfg.checkpoint.keep_last, hf_dir=hf_dir
    )
    run = Run(
        cfg=cfg,
        rank=info.rank,
        world_size=info.world_size,
        policy=policy,
        algo=algo,
        tokenizer=tokenizer,
        dataset=dataset,
        sampler=sampler,
        prompt_template=template,
        engine=None,
        reward_fn=None,
        checkpointer=checkpointer,
        logger=None,  # type: ignore[arg-type]
        watchdog=wd,
        pad_id=pad_id,
        teacher=teacher,
    )
    resume = resolve_verified(checkpointer, cfg.checkpoint.resume)  # damaged: older or exit 2
    if resume:
        state = checkpointer.load(
            resume, policy.model, policy.optimizer, teacher=teacher,
            layout=layout_of(cfg, info.world_size),
        )  # fmt: skip
        run.step = int(state["step"])
        run.rollout_version = int(state.get("rollout_version", run.step))
        sampler.load_state_dict(state["sampler"])
        policy.scheduler.load_state_dict(state["scheduler"])
        run.extra["resume_queue"] = state.get("rollout_queue")
    elif teacher is not None:
        policy.copy_into(teacher)
    if info.rank == 0:
        run.engine = make_engine(cfg, hf_dir)
        from rlrt_megatron.reward.math import MathReward

        # the trainer only waits while rewards are scored: one worker per core, at most 8
        workers = max(2, min(8, os.cpu_count() or 2))
        run.reward_fn = MathReward(timeout_s=cfg.timeouts.reward_per_sample, num_workers=workers)
    run.logger = MetricsLogger(
        cfg.run_dir,
        total_steps=cfg.train.steps,
        enabled=info.rank == 0,
        jsonl=cfg.logging.jsonl,
        tensorboard=cfg.logging.tensorboard,
        wandb_project=cfg.logging.wandb_project,
        console=cfg.logging.console,
        start_step=run.step,
        config=cfg.to_dict(),
        name=cfg.name,
    )
    if resume:
        run.logger.message(f"resumed from {resume} at step {run.step}")
    run.extra["data_skipped"] = {  # in every step's metrics: no prompt is dropped uncounted
        "data/skipped_too_long": n_too_long,
        "data/skipped_bad_rows": dataset.n_skipped,
    }
    if n_too_long:
        run.logger.message(
            f"data: {n_too_long} prompts longer than data.max_prompt_tokens="
            f"{cfg.data.max_prompt_tokens} skipped, {len(dataset)} left"
        )
    if dataset.n_skipped:
        run.logger.message(
            f"data: {dataset.n_skipped} bad rows skipped (data.on_bad_row=skip), first: "
            + "; ".join(dataset.skipped[:3])
        )
    # the engine samples with the policy's weights from the first step on (a resumed teacher
    # is already the checkpointed one: push the weights only)
    push_weights(run, run.step)
    if cfg.rollout.staleness:
        _start_queue(run, resume)
    return run


def _start_queue(run: Run, resume: str | None) -> None:
    """Asynchronous rollouts (max_staleness K >= 1): fresh, batches 1..K+1 with the initial
    weights; resumed at step k, the checkpoint's batches k+1..k+K as sampled, batch k+K+1
    regenerated with v_k (see `trainer/rollouts.py`)."""
    from rlrt_megatron.trainer.rollouts import RolloutQueue

    run.rollouts = q = RolloutQueue(run)
    meta = run.extra.pop("resume_queue", None)
    if meta is None:
        if resume:
            raise RuntimeError(
                f"{resume}: the checkpoint has no rollout queue (written with "
                "rollout.max_staleness=0); resume it with rollout.max_staleness=0"
            )
        q.start(run)
        return
    payloads = None
    if run.rank == 0:
        path = os.path.join(resume, ROLLOUT_QUEUE_FILE)
        payloads = torch.load(path, weights_only=False) if os.path.isfile(path) else {}
    q.restore(run, meta, payloads)


def load_dataset(cfg: TrainConfig) -> Any:
    from rlrt_megatron.data import load_prompt_dataset, rows_to_dataset

    d = cfg.data
    if d.path == "synthetic":
        from rlrt_megatron.data.synthetic import arithmetic_dataset

        rows = arithmetic_dataset(
            d.synthetic_size, seed=cfg.train.seed, max_operand=d.synthetic_max_operand
        )
        return rows_to_dataset(rows, name="synthetic")
    fmap = {"problem": d.prompt_key, "answer": d.answer_key, "solution": d.solution_key or None}
    return load_prompt_dataset(d.path, field_map=fmap, on_bad_row=d.on_bad_row)


def make_engine(cfg: TrainConfig, hf_dir: str) -> Any:
    """The rollout engine on rank 0: `local` (transformers) or `sglang`."""
    if cfg.rollout.engine == "sglang":
        from rlrt_megatron.config import REDACTED
        from rlrt_megatron.rollout.sglang import SGLangEngine

        key = cfg.rollout.sglang_api_key
        if not key or key == REDACTED:  # a config read back from a run dir holds no key
            key = os.environ.get("RLRT_ROLLOUT_API_KEY", "")
        kw: dict[str, Any] = {"record_experts": cfg.model.moe.routing_replay == "rollout"}
        return SGLangEngine.from_config(cfg, hf_dir, **kw, **({"api_key": key} if key else {}))
    from rlrt_megatron import platform
    from rlrt_megatron.rollout.local import LocalEngine

    # On a GPU the engine shares the trainer's device (weight sync is a device-to-device copy)
    # and decodes the whole batch at once; on CPU smaller chunks keep memory and latency low.
    rows = cfg.rollout.local_max_batch_rows or (64 if platform.is_cpu_mode() else 512)
    kwargs = dict(
        seed=cfg.rollout.seed,
        device=platform.device(),
        dtype=resolve_dtype(cfg.rollout.local_dtype),
        max_batch_rows=rows,
        length_tail=cfg.rollout.local_length_tail,
        record_experts=cfg.model.moe.routing_replay == "rollout",
    )
    if cfg.rollout.local_process or cfg.rollout.staleness:
        # its own process: generation runs while the trainer trains (asynchronous rollouts)
        from rlrt_megatron.rollout.process import ProcessEngine

        return ProcessEngine(model_dir_or_model=hf_dir, **kwargs)
    return LocalEngine(hf_dir, **kwargs)


def teardown(run: Run) -> None:
    if run.rollouts is not None:
        run.rollouts.close()
    if run.logger is not None:
        run.logger.close()
    if run.reward_fn is not None:
        run.reward_fn.close()
    if run.engine is not None:
        run.engine.shutdown()
    run.watchdog.close()
