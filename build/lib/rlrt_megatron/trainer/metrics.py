"""Per-step metrics sinks (rank 0): jsonl file, TensorBoard, wandb, and the console.

`metrics.jsonl` has one json object per step (`{"step": s, "reward/mean": ..., ...}`); Slurm
tooling and the resume tests read it. Appending is resume-safe: on resume, lines with a step
beyond the checkpoint are dropped first so the file stays one line per step.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

# What the console shows per step, in order (name in the metrics dict, short label).
CONSOLE = (
    ("reward/mean", "reward"),
    ("reward/pass_rate", "pass"),
    ("response/length_mean", "len"),
    ("loss/clipfrac", "clip"),
    ("time/step", "s/step"),
)


class MetricsLogger:
    """Writes metrics on rank 0; a no-op elsewhere.

    Args:
        run_dir: where `metrics.jsonl` and `tb/` go.
        total_steps: for the progress bar.
        jsonl, tensorboard: enable those sinks; wandb_project: empty = off.
        console: "rich" (progress bar), "plain" (a line per step) or "none".
        start_step: the first step of this process (resume): later jsonl lines are dropped.
    """

    def __init__(
        self,
        run_dir: str,
        *,
        total_steps: int,
        enabled: bool = True,
        jsonl: bool = True,
        tensorboard: bool = True,
        wandb_project: str = "",
        console: str = "rich",
        start_step: int = 0,
        config: dict | None = None,
        name: str = "run",
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.console = console if enabled else "none"
        self.jsonl_path = os.path.join(run_dir, "metrics.jsonl") if enabled and jsonl else None
        self._tb = None
        self._wandb = None
        self._progress = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if self.jsonl_path:
            _truncate_after(self.jsonl_path, start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tb"))
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                self._tb = None
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ImportError(
                    "logging.wandb_project is set but wandb is not installed: "
                    "pip install 'rlrt-megatron[wandb]' or set logging.wandb_project=''"
                ) from e
            self._wandb = wandb.init(
                project=wandb_project, name=name, config=config, resume="allow"
            )
        if self.console == "rich":
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self._progress.start()
            self._task = self._progress.add_task(
                name, total=total_steps, completed=start_step, info=""
            )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        if self.jsonl_path:
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, int | float) and k != "step":
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(row, step=step)
        info = "  ".join(
            f"{label} {row[k]:.3g}" for k, label in CONSOLE if isinstance(row.get(k), int | float)
        )
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)
        elif self.console == "plain":
            print(
                f"[{time.strftime('%H:%M:%S')}] step {step}/{self.total_steps}  {info}", flush=True
            )

    def message(self, text: str) -> None:
        if not self.enabled or self.console == "none":
            return
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return v


def _truncate_after(path: str, start_step: int) -> None:
    """Keep only lines with step <= start_step (a resumed run rewrites the later ones)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= start_step]
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


def read_metrics(path: str) -> list[dict]:
    """All rows of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]
