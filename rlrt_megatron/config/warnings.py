"""Settings that are valid but probably not what was meant: printed once, by the trainer at
start-up and by `rlrt slurm submit` before the job waits in a queue (never an error)."""

from __future__ import annotations

from typing import Any


def config_warnings(cfg: Any) -> list[str]:
    """One line per setting that silently does nothing or less than it seems."""
    out = []
    if cfg.eval.every > 0 and not cfg.eval.datasets:
        out.append(
            f"eval.every={cfg.eval.every} but eval.datasets is empty: no in-training eval will "
            "run; set eval.datasets=NAME=PATH[,NAME=PATH] (e.g. aime24=/shared/data/aime24.jsonl,"
            " docs/CLUSTER.md) or eval.every=0"
        )
    return out
