"""Atomic, resumable checkpoints: Megatron dist_checkpointing + a small trainer state.

Layout of `<checkpoint_dir>`::

    iter_0000012/
        dist/                    model (+ teacher copy) and optimizer, Megatron dist checkpoint
        trainer_state.json       step, data cursor, schedules, rollout version, Adam step,
                                 layout and global batch (rank 0)
        rng_rank<R>.pt           python / numpy / torch / megatron tracker RNG states (per rank)
        config.json              the run's TrainConfig
        hf/                      the HF config / tokenizer files (for `megatron-to-hf`)
        manifest.json            size + sha256 of every file, checked at resume (ckpt_manifest.py)
    latest                       text file: "iter_0000012"

Atomicity: every rank writes into `iter_N.tmp/` and fsyncs the files it wrote and their
directories (on a network file system only the writer's fsync flushes its pages); after a
barrier rank 0 fsyncs its own late files, renames the directory to `iter_N/` and only then
replaces `latest` (tmp file + `os.replace`). A crash (even `kill -9`) at any point leaves `latest`
naming a complete checkpoint; a stale `*.tmp` directory is ignored and removed by the next save.
`keep_last` prunes older complete checkpoints.

Resharding: every tensor is stored per parameter with the parameter's own sharding (the model's
sharded state dict; megatron's `fully_reshardable` optimizer format, for the plain and the
distributed optimizer alike), so a checkpoint loads at any TP / PP / DP layout. What megatron's
format leaves out, the Adam step, lives in `trainer_state.json` and is set into whichever Adam
runs (`set_adam_step`). `load(..., layout=)` refuses another global batch (`ResumeError`) and
logs a layout change. Checkpoints saved before (`dp_reshardable`) load at their own TP / PP
(any DP); another TP / PP is refused before megatron fails (`check_optimizer_format`).
Cost: saving gathers each TP x PP shard's distributed-optimizer state over gloo into the host
memory of its data-parallel rank 0 (megatron's memory-efficient variant: 12 bytes per parameter
of the shard there, 12 / DP on the other ranks; `rlrt plan` prints it), loading reads it whole.

Preemption: `SignalFlag` turns SIGTERM / SIGUSR1 into a flag the loop checks at its safe point
(end of a step); all ranks agree through an all-reduce, save, and exit 0 (Slurm requeues).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlrt_megatron.config import ConfigError
from rlrt_megatron.convert.io import copy_hf_metadata
from rlrt_megatron.convert.load import model_sharded_state_dict, unwrap
from rlrt_megatron.megatron.rng import rng_state, set_rng_state
from rlrt_megatron.trainer.ckpt_manifest import write_manifest
from rlrt_megatron.trainer.optimizer_state import (
    OPTIMIZER_FORMAT,
    OPTIMIZER_METADATA,
    adam_step,
    ensure_optimizer_state,
    load_optimizer_state,
    set_adam_step,
)

ITER_RE = re.compile(r"^iter_(\d{7})$")
LATEST = "latest"


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Who wrote which file of `iter_N.tmp/`: megatron's writer names each rank's shard files
# `__<rank>_<i>.distcp` (torch DCP's naming), each rank writes `rng_rank<R>.pt`; everything else
# (the dist checkpoint's metadata and common state, the trainer state, config, hf/) is rank 0's.
_RANK_FILE_RE = re.compile(r"(?:__(\d+)_\d+\.distcp|rng_rank(\d+)\.pt)$")


def _fsync_own(tmp: str, rank: int) -> None:
    """fsync the files of `tmp` that `rank` wrote and the directories holding them.

    Called by every rank before the barrier that precedes the rename: on a network file system
    an fsync from another client does not flush the writer's pages, so each rank makes its own
    writes durable (rank 0 again after writing its own files)."""
    for d, _, files in os.walk(tmp):
        for f in files:
            m = _RANK_FILE_RE.search(f)
            owner = int(m.group(1) or m.group(2)) if m else 0
            if owner == rank:
                _fsync_path(os.path.join(d, f))
        _fsync_path(d)  # the entries this rank created (one fsync per directory, cheap)


def write_atomic(path: str, text: str) -> None:
    """Write `text` to `path` via a fsynced tmp file and `os.replace`."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(os.path.dirname(os.path.abspath(path)))


# ---- RNG ----------------------------------------------------------------------------------


# ---- sharded state ------------------------------------------------------------------------


def _load_model_state(chunks: Sequence[Any], state: dict, prefix: str = "") -> None:
    # `sharded_state_dict(prefix=...)` prefixes the dict keys too: strip it, or the teacher's
    # `load_state_dict(strict=False)` would match nothing and silently keep its weights
    names = (
        [f"{prefix}model"]
        if len(chunks) == 1
        else [f"{prefix}model{i}" for i in range(len(chunks))]
    )
    for c, name in zip(chunks, names, strict=True):
        sd = {k.removeprefix(prefix): v for k, v in state[name].items()}
        unwrap(c).load_state_dict(sd, strict=False)


class ResumeError(ConfigError):
    """A checkpoint cannot be resumed with this run's settings (the message says why; `rlrt
    train` exits 2 with it)."""


# Settings that change what one step computes: they must match on resume. The layout (TP, PP,
# DP, VPP, EP / ETP, distributed optimizer) may change.
GLOBAL_BATCH_KEYS = ("global_batch", "prompts_per_step", "group_size", "mini_batch_prompts",
                     "ppo_epochs")  # fmt: skip
LAYOUT_KEYS = ("tp", "pp", "dp", "vpp", "ep", "etp", "distributed_optimizer")


def layout_of(cfg: Any, world_size: int, vpp: int | None = None) -> dict[str, Any]:
    """The run's parallel layout and global batch, as `save` / `load` compare them."""
    t = cfg.train
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    return {
        "tp": tp,
        "pp": pp,
        "dp": world_size // (tp * pp),
        "vpp": vpp,
        "ep": cfg.parallel.ep,
        "etp": cfg.parallel.etp or tp,  # (0 = tp)
        "distributed_optimizer": cfg.parallel.use_distributed_optimizer,
        "prompts_per_step": t.prompts_per_step,
        "group_size": cfg.rollout.group_size,
        "mini_batch_prompts": t.mini_batch_prompts,
        "ppo_epochs": t.ppo_epochs,
    }


def check_layout(saved: dict | None, current: dict | None, path: str) -> str | None:
    """Refuse a different global batch (ResumeError); return a line describing a layout change
    (None when the layout is the same or unknown)."""
    if not saved or not current:
        return None
    saved = {"ep": 1, "etp": saved.get("tp"), **saved}  # checkpoints from before EP was recorded
    diff = [
        f"{k} {saved[k]} -> {current[k]}"
        for k in GLOBAL_BATCH_KEYS
        if k in saved and k in current and saved[k] != current[k]
    ]
    if diff:
        raise ResumeError(
            f"checkpoint {path} was written with another global batch ({', '.join(diff)}): "
            "resuming would change what every later step computes (batch statistics, number of "
            "optimizer steps per RL step). Resume with the saved batch settings, or start a new "
            "run (checkpoint.resume=none) initialised from this checkpoint's weights"
        )
    a, b = saved.get("distributed_optimizer"), current.get("distributed_optimizer")
    if a is not None and b is not None and a != b:
        raise ResumeError(
            f"checkpoint {path} was written with parallel.use_distributed_optimizer={a}, this run "
            f"has {b}: the optimizer state formats differ (fp32 main params are kept only by the "
            f"distributed optimizer); resume with parallel.use_distributed_optimizer={a} (any "
            "TP / PP / DP layout works)"
        )
    changed = [
        f"{k} {saved.get(k)} -> {current.get(k)}"
        for k in LAYOUT_KEYS
        if k in current and saved.get(k) != current.get(k)
    ]
    if not changed:
        return None
    return f"resharding {path} to a new layout: {', '.join(changed)} (same global batch)"


def saved_layout(path: str, trainer_state: dict) -> dict | None:
    """The layout a checkpoint was written at: its trainer state's, or for checkpoints older
    than that record, its config.json's parallel sizes and its number of RNG files (ranks)."""
    if trainer_state.get("layout"):
        return trainer_state["layout"]
    if not os.path.isfile(os.path.join(path, "config.json")):
        return None
    with open(os.path.join(path, "config.json")) as f:
        par = json.load(f).get("parallel", {})
    tp, pp = par.get("tp", 1), par.get("pp", 1)
    ranks = sum(1 for n in os.listdir(path) if re.fullmatch(r"rng_rank\d+\.pt", n))
    return {"tp": tp, "pp": pp, "dp": ranks // (tp * pp) or None,
            "distributed_optimizer": par.get("use_distributed_optimizer", True)}  # fmt: skip


def check_optimizer_format(fmt: str, saved: dict | None, current: dict | None, path: str) -> None:
    """Refuse a `dp_reshardable` distributed-optimizer checkpoint at another TP / PP / VPP.

    That format (checkpoints from before `fully_reshardable`) stores the distributed optimizer's
    flat buckets, one tensor per model-parallel group: megatron reshards it over data-parallel
    ranks (checked at DP 1 <-> 2 <-> 4), but at another TP / PP its loader fails deep inside
    (a missing `dp_group_idx` key or a global shape mismatch)."""
    if fmt != "dp_reshardable" or not saved or not current:
        return
    if not saved.get("distributed_optimizer", True):  # the plain optimizer: per-parameter state
        return
    keys = [k for k in ("tp", "pp", "vpp") if k in saved and k in current]
    if all(saved[k] == current[k] for k in keys):
        return

    def sizes(lay: dict) -> str:
        return " x ".join(f"{k} {lay.get(k)}" for k in ("tp", "pp", "dp", "vpp") if k in lay)

    raise ResumeError(
        f"checkpoint {path} stores the distributed optimizer in megatron's `dp_reshardable` "
        f"format, which loads only at the tensor / pipeline sizes it was written with "
        f"({sizes(saved)}; this run: {sizes(current)}); any data-parallel size works. Resume it "
        f"once at {', '.join(f'parallel.{k}={saved[k]}' for k in keys if k != 'vpp')} and "
        f"save: checkpoints written now use `{OPTIMIZER_FORMAT}` and resume at any TP / PP / DP"
    )


def _sharded_state(
    model: Sequence[Any],
    optimizer: Any,
    teacher: Sequence[Any] | None,
    is_loading: bool,
    optimizer_format: str | None = None,
) -> dict:
    state = model_sharded_state_dict(model)
    if teacher is not None:
        state.update(model_sharded_state_dict(teacher, prefix="teacher."))
    if optimizer is not None:
        model_only = model_sharded_state_dict(model)
        state["optimizer"] = optimizer.sharded_state_dict(
            model_only,
            is_loading=is_loading,
            metadata={
                **OPTIMIZER_METADATA,
                "distrib_optim_sharding_type": optimizer_format or OPTIMIZER_FORMAT,
            },
        )
    return state


# ---- the checkpointer ---------------------------------------------------------------------


class Checkpointer:
    """Save / find / load checkpoints under `root` (collective: every rank calls save/load).

    Args:
        root: the checkpoint directory.
        keep_last: newest complete checkpoints to keep (0 = all).
        hf_dir: the run's Hugging Face model directory; its config / tokenizer files are copied
            to `iter_N/hf/` so `rlrt convert megatron-to-hf --ckpt iter_N/dist` needs no
            `--hf-config`.
    """

    def __init__(self, root: str, keep_last: int = 2, hf_dir: str | None = None) -> None:
        self.root = root
        self.keep_last = keep_last
        self.hf_dir = hf_dir
        # test hook: called after the shards are written, before the rename (kill -9 tests)
        self.before_commit: Callable[[str], None] | None = None

    # -- discovery ----------------------------------------------------------------------------
    def complete(self) -> list[str]:
        """Complete checkpoint directories, oldest first."""
        if not os.path.isdir(self.root):
            return []
        names = sorted(n for n in os.listdir(self.root) if ITER_RE.match(n))
        return [
            os.path.join(self.root, n)
            for n in names
            if os.path.isfile(os.path.join(self.root, n, "trainer_state.json"))
        ]

    def latest(self) -> str | None:
        """The checkpoint `latest` names (falling back to the newest complete one)."""
        ptr = os.path.join(self.root, LATEST)
        if os.path.isfile(ptr):
            with open(ptr) as f:
                name = f.read().strip()
            path = os.path.join(self.root, name)
            if os.path.isfile(os.path.join(path, "trainer_state.json")):
                return path
        done = self.complete()
        return done[-1] if done else None

    def resolve(self, resume: str) -> str | None:
        """`--resume auto|none|PATH` -> a checkpoint directory or None."""
        if resume in ("none", "", None):
            return None
        if resume == "auto":
            return self.latest()
        path = resume
        if os.path.isfile(os.path.join(path, LATEST)):
            path = Checkpointer(path).latest() or path
        if not os.path.isfile(os.path.join(path, "trainer_state.json")):
            raise FileNotFoundError(
                f"checkpoint.resume={resume}: not a complete checkpoint (no trainer_state.json); "
                "pass an iter_N directory, a checkpoint root with a `latest` file, auto or none"
            )
        return path

    # -- save ---------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        model: Sequence[Any],
        optimizer: Any,
        trainer_state: dict[str, Any],
        *,
        teacher: Sequence[Any] | None = None,
        config: dict | None = None,
        layout: dict | None = None,
        extra_files: dict[str, Any] | None = None,
    ) -> str:
        """Write `iter_<step>` atomically and point `latest` at it; returns its path.

        `layout` (`layout_of(cfg, world_size)`): the parallel layout and global batch, kept in
        the trainer state so a resume can tell a reshard (allowed) from a new batch (refused).
        `extra_files` (rank 0): file name -> object, `torch.save`d into the checkpoint (the
        asynchronous rollout queue). The dist checkpoint records the megatron-core version that
        wrote it (`megatron/compat.py`).
        """
        from rlrt_megatron.megatron import compat

        final = os.path.join(self.root, iter_name(step))
        tmp = final + ".tmp"
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if optimizer is not None:
            trainer_state = {
                **trainer_state,
                "optimizer_adam_step": adam_step(optimizer),
                "optimizer_format": OPTIMIZER_FORMAT,
            }
        if layout is not None:
            trainer_state = {**trainer_state, "layout": dict(layout)}
        if _is_rank0():
            os.makedirs(self.root, exist_ok=True)
            for name in os.listdir(self.root):  # stale tmp dirs of crashed saves
                if name.endswith(".tmp") and os.path.isdir(os.path.join(self.root, name)):
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
            os.makedirs(os.path.join(tmp, "dist"))
        _barrier()
        state = _sharded_state(model, optimizer, teacher, is_loading=False)
        compat.dist_save(state, os.path.join(tmp, "dist"))  # + who wrote it
        torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
        _fsync_own(tmp, rank)
        _barrier()
        if _is_rank0():
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump({**trainer_state, "step": step}, f, indent=1)
            if config is not None:
                with open(os.path.join(tmp, "config.json"), "w") as f:
                    json.dump(config, f, indent=1)
            for name, obj in (extra_files or {}).items():
                torch.save(obj, os.path.join(tmp, name))
            if self.hf_dir:
                copy_hf_metadata(self.hf_dir, os.path.join(tmp, "hf"))
            write_manifest(tmp)  # sizes + sha256 of every file, checked at resume
            _fsync_own(tmp, rank)  # rank 0's files written since the barrier
            if self.before_commit is not None:
                self.before_commit(tmp)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_path(self.root)
            write_atomic(os.path.join(self.root, LATEST), iter_name(step) + "\n")
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for path in self.complete()[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    # -- load ---------------------------------------------------------------------------------
    def load(
        self,
        path: str,
        model: Sequence[Any],
        optimizer: Any,
        *,
        teacher: Sequence[Any] | None = None,
        restore_rng: bool = True,
        layout: dict | None = None,
        log: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """Load model (+ teacher) and optimizer in place; return the trainer state.

        The checkpoint may have been written at another layout (TP, PP, VPP, DP; the distributed
        optimizer on or off as when saved): weights and optimizer state are resharded on load. With
        `layout` (this run's `layout_of`), a different global batch raises `ResumeError` before
        anything is loaded, and a layout change is reported through `log` (rank 0; default
        stderr). Checkpoints of megatron-core 0.16 and 0.19 load under either
        (`compat.dist_load`; a failure names the version that wrote it).
        """
        from rlrt_megatron.megatron import compat

        with open(os.path.join(path, "trainer_state.json")) as f:
            trainer_state = json.load(f)
        change = check_layout(trainer_state.get("layout"), layout, path)
        # checkpoints from before the reshardable format: loadable at their own TP / PP only
        fmt = trainer_state.get("optimizer_format", "dp_reshardable")
        if optimizer is not None:
            check_optimizer_format(fmt, saved_layout(path, trainer_state), layout, path)
        if change and _is_rank0():
            (log or (lambda m: print(f"[rlrt] {m}", file=sys.stderr, flush=True)))(change)
        if optimizer is not None:
            ensure_optimizer_state(optimizer)
        state = _sharded_state(model, optimizer, teacher, is_loading=True, optimizer_format=fmt)
        loaded = compat.dist_load(state, os.path.join(path, "dist"))  # any supported version
        _load_model_state(model, loaded)
        if teacher is not None:
            _load_model_state(teacher, loaded, prefix="teacher.")
        if optimizer is not None:
            with torch.no_grad():  # megatron copies into parameter views in place
                load_optimizer_state(optimizer, loaded["optimizer"], fmt)
            step = trainer_state.get("optimizer_adam_step")
            if step is not None:
                set_adam_step(optimizer, step)
        if restore_rng:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            rng_file = os.path.join(path, f"rng_rank{rank}.pt")
            if os.path.isfile(rng_file):  # absent when resuming at another world size
                rng = torch.load(rng_file, weights_only=False)
                if change:
                    # the tracker's streams are per TP rank: at another layout this rank's file
                    # belongs to another position; keep the streams seeded for this one
                    rng.pop("megatron_tracker", None)
                set_rng_state(rng)
        return trainer_state


class SignalFlag:
    """SIGTERM / SIGUSR1 -> a flag checked at the loop's safe point (checkpoint, exit 0)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> SignalFlag:
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def agreed(self) -> bool:
        """True on every rank if any rank got a signal (one all-reduce)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        if torch.distributed.is_initialized():
            from rlrt_megatron import platform

            flag = flag.to(platform.device())
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)
