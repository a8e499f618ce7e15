"""`rlrt compare`: several algorithms x seeds on one recipe, with confidence bands and a verdict.

    rlrt compare --recipe tiny_demo --algorithms rlrt,grpo,rlsd,sdpo,srpo --seeds 3 \
        [--steps N] [--run-dir DIR] [--parallel N|auto] [dotted.key=value ...]

Writes `<run_dir>/compare.csv`, `compare.png`, `summary.md` and `summary.json` (see
`compare/report.py`); the runs themselves are `<run_dir>/<algorithm>/seed<s>/` (see
`compare/runner.py`). Rerunning the same command continues: finished pairs are kept.
Exit status: 0 all pairs finished, 1 some failed, 2 bad arguments or config, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import platform as py_platform
import sys
import time
from typing import Any

DEFAULT_ALGORITHMS = "rlrt,grpo,rlsd,sdpo,srpo"


def register(subparsers: Any) -> None:
    c = subparsers.add_parser(
        "compare", help="several algorithms x seeds: compare.png, compare.csv, summary.md"
    )
    c.add_argument("--recipe", default="tiny_demo", help="base recipe (default tiny_demo)")
    c.add_argument(
        "--algorithms",
        default=DEFAULT_ALGORITHMS,
        help=f"comma-separated (default {DEFAULT_ALGORITHMS}); the recipe of algorithm A is "
        "<recipe>_A (or <stem>_A when the recipe is <stem>_<its algorithm>)",
    )
    c.add_argument(
        "--seeds", default="3", help="N (seeds 0..N-1) or a comma-separated list (default 3)"
    )
    c.add_argument("--steps", type=int, default=None, help="RL steps per run (train.steps)")
    c.add_argument("--run-dir", default="runs/compare", help="runs, model, outputs (reused)")
    c.add_argument(
        "--parallel",
        default="1",
        help="pairs at once: N, or auto (CPU: one per 2 cores and 3 GiB free memory; GPU: 4 "
        "per GPU); each CPU pair uses one thread (OMP_NUM_THREADS=1)",
    )
    c.add_argument("overrides", nargs="*", help="dotted.key=value for every run")
    c.set_defaults(func=cmd_compare)


def parse_seeds(text: str) -> list[int]:
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if len(parts) == 1 and "," not in text:
        n = int(parts[0])
        if n < 1:
            raise ValueError("--seeds N: N must be >= 1")
        return list(range(n))
    seeds = [int(p) for p in parts]
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"--seeds {text}: give distinct seeds")
    return seeds


def recipe_for(base: str, base_algo: str, algo: str, known: list[str]) -> str:
    """tiny_demo (rlrt) -> tiny_demo_grpo; qwen3_8b_rlrt -> qwen3_8b_grpo."""
    if algo == base_algo:
        return base
    stem = base[: -len(base_algo) - 1] if base.endswith(f"_{base_algo}") else base
    name = f"{stem}_{algo}"
    if name not in known:
        from rlrt_megatron.config import ConfigError

        raise ConfigError(
            f"--algorithms {algo}: no recipe {name} for it next to --recipe {base} "
            "(see `rlrt train --list`)"
        )
    return name


def cmd_compare(args: argparse.Namespace) -> int:
    from recipes import get_recipe, list_recipes
    from rlrt_megatron import platform
    from rlrt_megatron.compare import report
    from rlrt_megatron.compare.runner import (
        RESERVED,
        Pair,
        Runner,
        auto_parallel,
        gpu_slots,
        seed_overrides,
    )
    from rlrt_megatron.config import ConfigError
    from rlrt_megatron.trainer.cli import (
        GPU_DEMO_OVERRIDES,
        _prepare_demo_model,
        _quiet_library_warnings,
    )

    _quiet_library_warnings()
    start = time.perf_counter()

    def say(msg: str) -> None:
        print(f"rlrt compare: {msg}", flush=True)

    def fail(msg: str) -> int:
        print(f"rlrt compare: {msg}", file=sys.stderr)
        return 2

    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    if not algorithms or len(set(algorithms)) != len(algorithms):
        return fail(f"--algorithms {args.algorithms}: give distinct names")
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        return fail(str(e))
    for ov in args.overrides:
        if ov.split("=", 1)[0] in RESERVED:
            return fail(f"{ov}: `rlrt compare` sets this per run (use --run-dir)")
    user = [*args.overrides, *([f"train.steps={args.steps}"] if args.steps else [])]
    run_dir = os.path.abspath(args.run_dir)
    try:
        base = get_recipe(args.recipe, user)
        recipes = {
            a: recipe_for(args.recipe, base.algorithm.name, a, list_recipes()) for a in algorithms
        }
    except ConfigError as e:
        return fail(str(e))

    shared: list[str] = []
    if base.model.build_tiny and not base.model.hf_path:
        model_dir = os.path.join(run_dir, "model")
        # one warmed + converted model for every pair (built with the base train.seed)
        _prepare_demo_model(base, model_dir)
        shared += [
            f"model.hf_path={os.path.join(model_dir, 'hf')}",
            f"model.megatron_ckpt={os.path.join(model_dir, 'megatron')}",
        ]
        if not platform.is_cpu_mode():
            shared += GPU_DEMO_OVERRIDES
    shared.append("logging.console=plain")  # a line per step in each run's train.log

    pairs: list[Pair] = []
    for seed in seeds:  # seed-major: an interrupted comparison has every algorithm's first seeds
        for algo in algorithms:
            pdir = os.path.join(run_dir, algo, f"seed{seed}")
            ov = [
                *shared,
                *user,
                *seed_overrides(base.train.seed, base.rollout.seed, seed),
                f"logging.run_dir={pdir}",
                "checkpoint.resume=auto",
            ]
            try:
                cfg = get_recipe(recipes[algo], ov)
            except ConfigError as e:
                return fail(f"{algo}: {e}")
            config = {k: v for k, v in cfg.to_dict().items() if k != "logging"}
            pairs.append(Pair(algo, seed, recipes[algo], pdir, ov, cfg.train.steps, config))

    gpus = gpu_slots()
    try:
        parallel = (
            auto_parallel(len(pairs), gpus) if args.parallel == "auto" else int(args.parallel)
        )
    except ValueError:
        return fail(f"--parallel {args.parallel}: give a number or auto")
    where = platform.device_name() if gpus else "CPU"
    say(
        f"{len(algorithms)} algorithm(s) x {len(seeds)} seed(s) = {len(pairs)} runs of "
        f"{pairs[0].steps} steps from {args.recipe} on {where} ({os.cpu_count()} cores), "
        f"{parallel} at a time; "
        f"in {run_dir}"
    )
    try:
        out = Runner(run_dir, pairs, parallel, gpus=gpus, log=say).run()
    except RuntimeError as e:
        return fail(str(e))
    wall = time.perf_counter() - start

    done = [p for p in pairs if p in out.done]
    if done:
        runs = [
            report.RunRows(
                p.algorithm,
                p.seed,
                report.read_metrics(os.path.join(p.run_dir, "metrics.jsonl")),
                _pair_seconds(p),
            )
            for p in done
        ]
        present = [a for a in algorithms if any(r.algorithm == a for r in runs)]
        title = (
            f"rlrt compare: {args.recipe}, {pairs[0].steps} steps, "
            f"{len(present)} algorithms x {len(seeds)} seeds ({where})"
        )
        header = _header(args, base, pairs, done, runs, parallel, where, wall, seeds)
        report.write_csv(runs, os.path.join(run_dir, "compare.csv"))
        summary = report.summarize(runs, present)
        text = report.write_summary(
            summary,
            os.path.join(run_dir, "summary.md"),
            os.path.join(run_dir, "summary.json"),
            header=header,
        )
        report.plot(runs, present, os.path.join(run_dir, "compare.png"), title)
        print(text)
        say(f"wrote {run_dir}/compare.png, compare.csv, summary.md ({len(done)}/{len(pairs)} runs)")
    if out.failed:
        say("failed: " + ", ".join(p.name for p in out.failed) + " (rerun to retry them)")
        return 1
    if out.interrupted or len(done) < len(pairs):
        say(f"stopped with {len(done)}/{len(pairs)} runs finished: rerun to continue")
        return 130
    return 0


def _pair_seconds(p: Any) -> float:
    import json

    from rlrt_megatron.compare.runner import DONE_FILE

    try:
        with open(os.path.join(p.run_dir, DONE_FILE)) as f:
            return float(json.load(f).get("seconds", 0.0))
    except (OSError, ValueError):
        return 0.0


def _header(args, base, pairs, done, runs, parallel, where, wall, seeds) -> list[str]:
    secs = [r.seconds for r in runs if r.seconds]
    timing = ""
    if secs:
        timing = (
            f" The runs took {sum(secs) / 60:.1f} min together "
            f"({min(secs) / 60:.1f} to {max(secs) / 60:.1f} min each)."
        )
    algos = ", ".join(dict.fromkeys(p.algorithm for p in done))
    lines = [
        f"# rlrt compare: {args.recipe}, {pairs[0].steps} steps",
        "",
        f"Algorithms {algos}; seeds {', '.join(map(str, seeds))}: seed s runs with "
        f"`train.seed={base.train.seed}+s` and `rollout.seed={base.rollout.seed}+s` (prompt order, "
        "training problems, sampling); every run starts from the same SFT-warmed model.",
        f"Ran on {where} ({py_platform.machine()}, {os.cpu_count()} cores), {parallel} run(s) at a "
        f"time; this `rlrt compare` call took {wall / 60:.1f} min.{timing}",
    ]
    if args.overrides:
        lines.append("Overrides: `" + " ".join(args.overrides) + "`.")
    if len(done) < len(pairs):
        lines.append(f"**Partial: {len(done)} of {len(pairs)} runs finished.**")
    return [*lines, ""]
