"""The file system paths a job's config names, as `rlrt slurm submit` checks and mounts them.

`named_paths` lists them (model, converted checkpoint, data, eval sets, checkpoint and run dirs,
the disk weight-sync dir, an explicit resume checkpoint). `missing_inputs` names the inputs that
do not exist on the cluster's shared storage (a job would otherwise fail after its queue wait);
`container_mounts` gives the pyxis mounts that make every one of them visible inside a container
at the same path (the checkout and the log dir are mounted by slurm/rlrt.sbatch itself);
`checkpoint_source` says which Megatron checkpoint the job will start from.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class NamedPath:
    key: str  # the config key, e.g. `data.path`, `eval.datasets[aime24]`
    path: str  # as the job sees it (absolute)
    is_input: bool  # must exist before the job starts
    is_dir: bool  # a directory (mounted itself) or a file (its directory is mounted)


def _eval_paths(specs: list[str]) -> list[tuple[str, str]]:
    out = []
    for spec in specs:
        spec = str(spec).strip()
        name, eq, path = spec.partition("=")
        if eq:
            out.append((name.strip(), path.strip().partition("#")[0]))
        elif "/" in spec or spec.endswith((".jsonl", ".json", ".parquet")):
            out.append((Path(spec).stem, spec.partition("#")[0]))
    return out


def named_paths(cfg: Any, resolve: Callable[[str], str]) -> list[NamedPath]:
    """Every path in `cfg`, resolved by `resolve` (relative paths are relative to the job's
    home, the checkout the job runs in)."""
    m, d = cfg.model, cfg.data
    out: list[NamedPath] = []
    if m.hf_path:
        out.append(NamedPath("model.hf_path", resolve(m.hf_path), True, True))
    if m.megatron_ckpt:
        out.append(NamedPath("model.megatron_ckpt", resolve(m.megatron_ckpt), True, True))
    if d.path and d.path != "synthetic":
        local = resolve(d.path.partition("#")[0])
        out.append(NamedPath("data.path", local, True, not Path(local).suffix))
    for name, path in _eval_paths(list(cfg.eval.datasets)):
        local = resolve(path)
        out.append(NamedPath(f"eval.datasets[{name}]", local, True, not Path(local).suffix))
    out.append(NamedPath("checkpoint.dir", resolve(cfg.checkpoint_dir), False, True))
    out.append(NamedPath("logging.run_dir", resolve(cfg.run_dir), False, True))
    if getattr(cfg.rollout, "sglang_sync_dir", ""):
        out.append(NamedPath("rollout.sglang_sync_dir", resolve(cfg.rollout.sglang_sync_dir),
                             False, True))  # fmt: skip
    if cfg.checkpoint.resume not in ("auto", "none", ""):
        out.append(NamedPath("checkpoint.resume", resolve(cfg.checkpoint.resume), True, True))
    return out


def missing_inputs(paths: list[NamedPath], exists: Callable[[str], bool]) -> list[str]:
    """One message per input that `exists` does not find (data, model, eval sets, ...)."""
    hints = {
        "model.hf_path": "download the model there (huggingface-cli download ... --local-dir)",
        "model.megatron_ckpt": "convert once: rlrt convert hf-to-megatron --hf ... --out ...",
        "data.path": "make it: rlrt data prepare dapo-math-17k --src <download> --out ...",
    }
    out = []
    for p in paths:
        if p.is_input and not exists(p.path):
            hint = hints.get(p.key, "copy it to the shared storage or fix the path")
            out.append(f"{p.key}={p.path} does not exist on the cluster's shared storage; {hint}")
    return out


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def container_mounts(paths: list[NamedPath], covered: list[str]) -> list[str]:
    """`src:dst` pyxis mounts (same path inside) for every path not already under a directory
    in `covered` (the checkout, the log dir, the user's mounts' destinations): an input
    directory itself, an input file's directory, the parent of a directory the job writes
    (the run dir may not exist yet; pyxis needs the source to). Nested mounts fold into their
    parent."""
    want: list[str] = []
    for p in paths:
        d = os.path.normpath(p.path if p.is_dir and p.is_input else os.path.dirname(p.path))
        if d != "/" and not any(_under(d, c) for c in covered):
            want.append(d)
    roots: list[str] = []
    for d in sorted(set(want), key=len):
        if not any(_under(d, r) for r in roots):
            roots.append(d)
    return [f"{d}:{d}" for d in sorted(roots)]


def checkpoint_source(cfg: Any, resolve: Callable[[str], str]) -> str:
    """Which Megatron checkpoint the job starts from, in one line (`rlrt slurm submit`)."""
    if cfg.model.megatron_ckpt:
        return (
            f"initial weights: model.megatron_ckpt={resolve(cfg.model.megatron_ckpt)} "
            "(converted once; no conversion in the job)"
        )
    if cfg.model.build_tiny and not cfg.model.hf_path:
        return "initial weights: the built-in tiny model (built and converted by rank 0)"
    target = resolve(os.path.join(cfg.run_dir, "model", "megatron"))
    return (
        f"initial weights: model.megatron_ckpt is empty: rank 0 converts model.hf_path="
        f"{resolve(cfg.model.hf_path)} to {target} inside the job (once per run dir) unless it "
        "exists; convert once with `rlrt convert hf-to-megatron` and set "
        "model.megatron_ckpt=<that dir> to share it between runs"
    )
