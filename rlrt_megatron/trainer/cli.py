"""`rlrt train` and `rlrt demo`.

    rlrt train --recipe NAME [dotted.key=value ...] [--resume auto|none|PATH]
    rlrt train --list                  # recipe names
    rlrt train --help-config           # every config key with its default and meaning
    rlrt demo [--compare] [--steps N] [--run-dir DIR]

`rlrt train` runs on every rank (torchrun / srun start one process per GPU); exit status 0 when
done or preempted (SIGTERM / SIGUSR1: checkpoint written, Slurm requeues), 2 for a bad config
or no intact checkpoint to resume, 3 when a phase timed out (the watchdog's stacks are in
`<run_dir>/logs/`), 4 when a checkpoint could not be written (disk full), 5 for a NaN / Inf
under `train.on_nonfinite=stop` (all codes: `trainer/faults.py`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="RL training from a recipe (+ dotted overrides)")
    p.add_argument("--recipe", help="recipe name (see --list)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. algorithm.rlrt.alpha=0.5")
    p.add_argument("--resume", default=None, help="auto | none | PATH (checkpoint.resume)")
    p.add_argument("--list", action="store_true", help="list recipes and exit")
    p.add_argument("--help-config", action="store_true", help="document every config key")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (no world-size check)")  # fmt: skip
    p.set_defaults(func=cmd_train)

    d = subparsers.add_parser(
        "demo", help="tiny model, RLRT on synthetic arithmetic (CPU, or the GPU when present)"
    )
    d.add_argument("--compare", action="store_true", help="also run GRPO and plot both")
    d.add_argument("--steps", type=int, default=None, help="RL steps (tiny_demo: 100)")
    d.add_argument("--run-dir", default="runs/demo", help="where runs, plots, cache go")
    d.add_argument("overrides", nargs="*", help="dotted.key=value overrides of tiny_demo")
    d.set_defaults(func=cmd_demo)


def _quiet_library_warnings() -> None:
    """Hide library deprecation chatter that users cannot act on (megatron-core 0.16 and torch
    warn about their own internals on every step); our own warnings and errors still show.
    Set PYTHONWARNINGS to see everything."""
    import warnings

    if os.environ.get("PYTHONWARNINGS"):
        return
    for module in (r"megatron\..*", r"torch\..*", r"transformers\..*"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    warnings.filterwarnings("ignore", message=r"full scope is deprecated")
    # megatron modules say this at import, before platform.apply_cpu_shims can silence it
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed.*")
    warnings.filterwarnings(
        "ignore", message=r"The \.grad attribute of a Tensor that is not a leaf"
    )


def _resolve(recipe: str, overrides: list[str], resume: str | None) -> Any:
    from recipes import get_recipe

    if resume is not None:
        overrides = [*overrides, f"checkpoint.resume={resume}"]
    return get_recipe(recipe, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from rlrt_megatron.config import ConfigError, describe

    _quiet_library_warnings()

    if args.list:
        from recipes import list_recipes

        print("\n".join(list_recipes()))
        return 0
    if args.help_config:
        print(describe())
        return 0
    if not args.recipe:
        print("rlrt train: --recipe NAME is required (see `rlrt train --list`)", file=sys.stderr)
        return 2
    try:
        cfg = _resolve(args.recipe, args.overrides, args.resume)
    except ConfigError as e:
        print(f"rlrt train: {e}", file=sys.stderr)
        return 2
    if args.print_config:  # printing needs no cluster: no world-size check (a login node)
        print(cfg.to_json())
        return 0
    try:
        from rlrt_megatron.trainer.setup import preflight

        preflight(cfg)  # model shape and world size checks, before any work
    except ConfigError as e:
        print(f"rlrt train: {e}", file=sys.stderr)
        return 2
    from rlrt_megatron.trainer import faults
    from rlrt_megatron.trainer.train import train

    try:
        out = train(cfg)
    except ConfigError as e:  # checks that need the model config / world size
        print(f"rlrt train: {e}", file=sys.stderr)
        return 2
    except faults.CheckpointWriteError as e:  # exit codes: trainer/faults.py
        print(f"rlrt train: {e}", file=sys.stderr)
        return faults.EXIT_CHECKPOINT_WRITE
    except faults.NonFiniteError as e:
        print(f"rlrt train: {e}", file=sys.stderr)
        return faults.EXIT_NONFINITE
    return 0 if out["status"] in ("done", "preempted", "stopped") else 1


# On a GPU the tiny model is latency-bound: fewer, larger micro-batches (CPU keeps the recipe's).
GPU_DEMO_OVERRIDES = ["train.max_tokens_per_microbatch=65536"]


def cmd_demo(args: argparse.Namespace) -> int:
    """Tiny Qwen3, SFT warm-up, conversion, RLRT (and GRPO with --compare), reward.png."""
    from rlrt_megatron import platform
    from rlrt_megatron.config import ConfigError

    _quiet_library_warnings()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    algos = ["rlrt", "grpo"] if args.compare else ["rlrt"]
    results: dict[str, list[dict]] = {}
    model_dir = os.path.join(args.run_dir, "model")
    for algo in algos:
        recipe = "tiny_demo" if algo == "rlrt" else f"tiny_demo_{algo}"
        ov = [
            f"logging.run_dir={os.path.join(args.run_dir, algo)}",
            # one warmed + converted model for every algorithm of the comparison
            f"model.hf_path={os.path.join(model_dir, 'hf')}",
            f"model.megatron_ckpt={os.path.join(model_dir, 'megatron')}",
            "checkpoint.resume=none",
            *([] if platform.is_cpu_mode() else GPU_DEMO_OVERRIDES),
            *args.overrides,
        ]
        if args.steps is not None:
            ov.append(f"train.steps={args.steps}")
        try:
            from recipes import get_recipe

            cfg = get_recipe(recipe, ov)
        except ConfigError as e:
            print(f"rlrt demo: {e}", file=sys.stderr)
            return 2
        _prepare_demo_model(cfg, model_dir)
        from rlrt_megatron.trainer.train import train

        where = platform.device_name()
        print(f"rlrt demo: {algo} on the tiny model for {cfg.train.steps} steps on {where}")
        results[algo] = train(cfg)["metrics"]
    out = os.path.join(args.run_dir, "reward.png")
    plot_rewards(results, out, device=platform.device_name())
    for algo, rows in results.items():
        first, last = _mean(rows[:5]), _mean(rows[-5:])
        print(
            f"rlrt demo: {algo}: mean reward first 5 steps {first:.3f} -> last 5 steps {last:.3f}"
        )
        print(f"rlrt demo: {algo}: {phase_times(rows)}")
    print(f"rlrt demo: wrote {out} in {time.perf_counter() - start:.0f}s")
    return 0


def _prepare_demo_model(cfg: Any, model_dir: str) -> None:
    """Build + SFT-warm the tiny model and convert it once (cached in `model_dir`)."""
    from rlrt_megatron.trainer.warmup import build_warm_tiny_model

    hf = os.path.join(model_dir, "hf")
    build_warm_tiny_model(hf, cfg, log=lambda s: print(f"rlrt demo: {s}", flush=True))
    meg = os.path.join(model_dir, "megatron")
    stamp = os.path.join(hf, "rlrt_sft.json")
    done = os.path.join(meg, ".source_mtime")
    mtime = str(os.path.getmtime(stamp))
    if os.path.isfile(done) and open(done).read() == mtime:
        return
    import shutil

    from rlrt_megatron.convert.hf_to_megatron import hf_to_megatron

    shutil.rmtree(meg, ignore_errors=True)
    hf_to_megatron(hf, meg, spec=cfg.model.spec, show_progress=False)
    with open(done, "w") as f:
        f.write(mtime)


def _mean(rows: list[dict], key: str = "reward/mean") -> float:
    vals = [r[key] for r in rows if key in r]
    return sum(vals) / max(len(vals), 1)


def phase_times(rows: list[dict]) -> str:
    """`per step 0.41 s (rollout 0.20, reward 0.03, ...)`: mean seconds over the steps after
    the first (which includes one-time compilation and allocator warm-up)."""
    rows = rows[1:] or rows
    keys = [k for k in rows[0] if k.startswith("time/") and k != "time/step"] if rows else []
    parts = ", ".join(f"{k[5:]} {_mean(rows, k):.3f}" for k in keys)
    return f"per step {_mean(rows, 'time/step'):.3f} s ({parts})"


def plot_rewards(results: dict[str, list[dict]], path: str, device: str = "CPU") -> None:
    """Reward and pass rate vs step (raw + 5-step mean), and the fixed eval set's avg@k when the
    run evaluated; one line per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eval_key = next(
        (
            k
            for rows in results.values()
            for r in rows
            for k in r
            if k.startswith("eval/average/avg@")
        ),
        None,
    )
    panels = [
        ("reward/mean", "mean reward (training batch)"),
        ("reward/pass_rate", "pass rate (solid) and pass@G (dashed)"),
    ]
    if eval_key:
        panels.append((eval_key, f"fixed eval set: {eval_key.split('/')[-1]}"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for algo, rows in results.items():
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if not pts:
                continue
            steps, vals = zip(*pts, strict=True)
            if key.startswith("eval/"):
                ax.plot(steps, vals, marker="o", label=algo.upper(), linewidth=2)
                continue
            smooth = [
                sum(vals[max(0, i - 4) : i + 1]) / len(vals[max(0, i - 4) : i + 1])
                for i in range(len(vals))
            ]
            (line,) = ax.plot(steps, smooth, label=f"{algo.upper()} (5-step mean)", linewidth=2)
            ax.plot(steps, vals, color=line.get_color(), alpha=0.3, linewidth=1)
            if key == "reward/pass_rate":  # and the share of prompts with >= 1 correct rollout
                g = [r.get("reward/pass_at_group", 0.0) for r in rows]
                gs = [
                    sum(g[max(0, i - 4) : i + 1]) / len(g[max(0, i - 4) : i + 1])
                    for i in range(len(g))
                ]
                ax.plot(
                    steps,
                    gs,
                    color=line.get_color(),
                    linestyle="--",
                    label=f"{algo.upper()} pass@G",
                )
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"rlrt demo: tiny Qwen3 on synthetic arithmetic ({device})")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
