"""Checkpoint manifests: the size and sha256 of every file of a checkpoint, written with it and
checked before it is loaded, so a damaged checkpoint is never trained on.

`iter_N/manifest.json`::

    {"format": 1, "files": {"dist/__0_0.distcp": {"size": 81920, "sha256": "9f2c..."}, ...}}

Rank 0 writes it into `iter_N.tmp/` after every other file is there and before the rename
(`write_manifest`, called by `Checkpointer.save`), so it describes the checkpoint as it was
committed. Files are hashed by a few threads (hashlib releases the GIL): about the speed of
reading the checkpoint once.

At resume (`resolve_verified`, rank 0 decides, every rank gets the same answer):

- a file missing, of another size (a truncated write) or with another sha256 (a flipped byte):
  `verify` returns one line per such file, naming it. With `checkpoint.resume=auto` the
  checkpoint is skipped with a warning naming the files, and the next older complete checkpoint
  is tried (newest first); when none is good, `CheckpointDamaged` (a `ConfigError`: `rlrt
  train` exits 2) lists what was wrong with each. A damaged checkpoint named explicitly
  (`checkpoint.resume=PATH`) raises `CheckpointDamaged` (no fallback: the user chose it).
- an unreadable manifest (not json): the checkpoint counts as damaged.
- no manifest (written before manifests existed): loaded unverified, with a warning.

Files added after the manifest was written are ignored (they were not part of the commit).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from rlrt_megatron.config import ConfigError

MANIFEST = "manifest.json"
FORMAT = 1
_CHUNK = 8 << 20


class CheckpointDamaged(ConfigError):
    """No checkpoint that passes its manifest check can be resumed (`rlrt train` exits 2); the
    message names each damaged file."""


def _relative_files(root: str) -> list[str]:
    out = []
    for d, _, files in os.walk(root):
        for f in files:
            rel = os.path.relpath(os.path.join(d, f), root)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _hash_file(path: str) -> dict[str, Any]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
            size += len(block)
    return {"size": size, "sha256": h.hexdigest()}


def _hash_all(root: str, rels: Iterable[str]) -> dict[str, dict[str, Any]]:
    rels = list(rels)
    workers = max(1, min(8, os.cpu_count() or 1, len(rels)))
    with ThreadPoolExecutor(workers) as pool:
        sums = pool.map(lambda r: _hash_file(os.path.join(root, r)), rels)
        return dict(zip(rels, sums, strict=True))


def write_manifest(ckpt_dir: str) -> str:
    """Hash every file under `ckpt_dir` into `ckpt_dir/manifest.json` (fsynced); its path."""
    files = _hash_all(ckpt_dir, _relative_files(ckpt_dir))
    path = os.path.join(ckpt_dir, MANIFEST)
    with open(path, "w") as f:
        json.dump({"format": FORMAT, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return path


def verify(ckpt_dir: str) -> list[str] | None:
    """Check `ckpt_dir` against its manifest: None when it has none (unverifiable), else one line
    per damaged file ([] = intact)."""
    path = os.path.join(ckpt_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (ValueError, KeyError, TypeError) as e:
        return [f"{MANIFEST}: unreadable ({type(e).__name__}: {e})"]
    problems, present = [], []
    for rel, want in sorted(files.items()):
        full = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(full):
            problems.append(f"{rel}: missing")
            continue
        size = os.path.getsize(full)
        if size != want["size"]:
            problems.append(f"{rel}: {size} bytes, the manifest says {want['size']} (truncated?)")
        else:
            present.append(rel)
    for rel, got in _hash_all(ckpt_dir, present).items():
        if got["sha256"] != files[rel]["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest (changed after the write)")
    return problems


def _warn(msg: str) -> None:
    print(f"[rlrt] warning: {msg}", file=sys.stderr, flush=True)


def _step_of(path: str) -> int:
    return int(os.path.basename(os.path.normpath(path)).split("_")[-1])


def _named_by_latest(root: str) -> str | None:
    """The directory the `latest` pointer under `root` names, if it exists."""
    try:
        with open(os.path.join(root, "latest")) as f:
            path = os.path.join(root, f.read().strip())
    except OSError:
        return None
    return path if os.path.isdir(path) else None


def choose_checkpoint(
    checkpointer: Any, resume: str, warn: Callable[[str], None] = _warn
) -> str | None:
    """The checkpoint to resume (`Checkpointer.resolve` plus the manifest check, one process):
    with `auto`, the newest one that passes, warning about each one skipped; raises
    `CheckpointDamaged` when none passes (or the named one does not)."""
    first = checkpointer.resolve(resume)
    damaged = []
    if resume == "auto":
        named = _named_by_latest(checkpointer.root)
        if named and named != first:  # `latest` names a directory that lost its trainer state
            line = (
                f"{named} is damaged: {'; '.join(verify(named) or ['trainer_state.json: missing'])}"
            )
            damaged.append(line)
            warn(line + " -- skipping it, trying an older checkpoint")
    if first is None:
        if damaged:
            raise CheckpointDamaged(
                f"no intact checkpoint to resume: {damaged[0]}. Nothing was loaded; restore "
                "the files or start over (checkpoint.resume=none)"
            )
        return None
    candidates = [first]
    if resume == "auto":
        older = [p for p in checkpointer.complete() if _step_of(p) < _step_of(first)]
        candidates += older[::-1]
    for path in candidates:
        problems = verify(path)
        if problems is None:
            warn(f"{path} has no {MANIFEST} (written before checkpoint checksums): loading it "
                 "unverified")  # fmt: skip
            return path
        if not problems:
            if damaged:
                warn(f"resuming from {path}, the newest intact checkpoint (step {_step_of(path)})")
            return path
        line = f"{path} is damaged: {'; '.join(problems)}"
        damaged.append(line)
        if resume == "auto":
            warn(line + " -- skipping it, trying an older checkpoint")
    raise CheckpointDamaged(
        "no intact checkpoint to resume: "
        + " | ".join(damaged)
        + ". Nothing was loaded. Restore the files, resume from another checkpoint "
        "(checkpoint.resume=PATH), or start over (checkpoint.resume=none)"
    )


def resolve_verified(
    checkpointer: Any, resume: str, warn: Callable[[str], None] = _warn
) -> str | None:
    """`choose_checkpoint` on rank 0, the same answer (or the same error) on every rank."""
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    answer: tuple[str, Any] | None = None
    if rank0:
        try:
            answer = ("ok", choose_checkpoint(checkpointer, resume, warn))
        except (ConfigError, FileNotFoundError) as e:
            answer = (type(e).__name__, str(e))
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        from rlrt_megatron.megatron.train_step import broadcast_object

        answer = broadcast_object(answer, src=0)
    assert answer is not None
    kind, value = answer
    if kind == "ok":
        return value
    if kind == "FileNotFoundError":
        raise FileNotFoundError(value)
    raise (CheckpointDamaged if kind == "CheckpointDamaged" else ConfigError)(value)
