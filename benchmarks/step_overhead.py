"""Step time of RLRT divided by GRPO's on the tiny model: same batch, same seed, per-phase split.

    python benchmarks/step_overhead.py [--repeats 5] [--run-dir runs/bench] [dotted.key=value ...]

Both algorithms start from the same warmed tiny model and sample their step-1 batch with the
same seed (identical weights -> identical rollouts). The rollout and reward phases are timed on
those initial weights; then every repeat times logprobs -> advantages -> update -> sync on a fresh
copy of the same batch. The teacher forward
(the `logprobs` phase) is RLRT's only extra work; the goal is a total ratio <= 1.3.
`rlrt_all` is RLRT with the teacher forward on every rollout with a context (as before issue 23:
`teacher.probe_rows` unbounded) instead of its `teacher_rows` (correct rollouts with a peer, plus
the 16 diagnostic probe rows): the teacher forward's cost (logprobs phase minus GRPO's) should
scale with the share of rows it runs on.
Prints a table (median seconds per phase) and `ratio_rlrt_over_grpo=<float>` on its last line.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PHASES = ("rollout", "reward", "logprobs", "advantages", "update", "sync")


def time_algorithm(algo: str, args: argparse.Namespace) -> dict[str, list[float]]:
    from recipes import get_recipe
    from rlrt_megatron.trainer import setup, steps
    from rlrt_megatron.trainer.cli import _prepare_demo_model

    model_dir = os.path.join(args.run_dir, "model")
    extra = ["teacher.probe_rows=1000000"] if algo == "rlrt_all" else []
    algo = algo.removesuffix("_all")
    recipe = "tiny_demo" if algo == "rlrt" else f"tiny_demo_{algo}"
    cfg = get_recipe(
        recipe,
        [
            f"logging.run_dir={os.path.join(args.run_dir, algo)}",
            f"model.hf_path={os.path.join(model_dir, 'hf')}",
            f"model.megatron_ckpt={os.path.join(model_dir, 'megatron')}",
            "checkpoint.resume=none",
            "logging.console=none",
            "logging.tensorboard=false",
            # the repeats re-score step 1's batch after updates: not a stale engine
            "rollout.sync_check_tol=-1",
            *args.overrides,
            *extra,
        ],
    )
    _prepare_demo_model(cfg, model_dir)
    run = setup.setup(cfg)
    try:
        frozen = steps.rollout(run, 1)
        steps.reward(run, frozen)
        times: dict[str, list[float]] = {p: [] for p in PHASES}
        # rollout + reward first, on the initial weights: identical work for both algorithms
        for rep in range(args.repeats + 1):  # the first repeat warms up
            s = time.perf_counter()
            batch = steps.rollout(run, 1)
            t_roll = time.perf_counter() - s
            s = time.perf_counter()
            steps.reward(run, batch)
            if rep > 0:
                times["reward"].append(time.perf_counter() - s)
                times["rollout"].append(t_roll)
        for rep in range(args.repeats + 1):
            t: dict[str, float] = {}
            batch = copy.copy(frozen)
            s = time.perf_counter()
            steps.logprobs(run, batch)
            t["logprobs"] = time.perf_counter() - s
            s = time.perf_counter()
            prepared = steps.advantages(run, batch, 1)
            t["advantages"] = time.perf_counter() - s
            s = time.perf_counter()
            steps.update(run, batch, prepared)
            t["update"] = time.perf_counter() - s
            s = time.perf_counter()
            steps.sync(run, 1)
            t["sync"] = time.perf_counter() - s
            if rep > 0:
                for k, v in t.items():
                    times[k].append(v)
        times["tokens"] = [float(frozen.mask.sum()) if frozen.mask is not None else 0.0]
        times["teacher_rows"] = [
            sum(p is not None for p in batch.teacher_prefixes) / len(batch.texts)
        ]
        times["correct"] = [float((frozen.rewards > 0.5).float().mean())]
    finally:
        setup.teardown(run)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--run-dir", default="runs/bench")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    algos = ("grpo", "rlrt", "rlrt_all")
    res = {algo: time_algorithm(algo, args) for algo in algos}
    med = {a: {ph: statistics.median(r[ph]) for ph in PHASES} for a, r in res.items()}
    print(f"\nmedian seconds per phase over {args.repeats} repeats (same batch, same seed)")
    print(f"{'phase':<12}" + "".join(f"{a:>10}" for a in algos) + f"{'rlrt/grpo':>12}")
    for ph in PHASES:
        g, r = med["grpo"][ph], med["rlrt"][ph]
        cells = "".join(f"{med[a][ph]:>10.3f}" for a in algos)
        print(f"{ph:<12}{cells}{r / g if g > 0 else float('nan'):>12.2f}")
    tot = {a: sum(med[a].values()) for a in algos}
    print(
        f"{'step':<12}"
        + "".join(f"{tot[a]:>10.3f}" for a in algos)
        + f"{tot['rlrt'] / tot['grpo']:>12.2f}"
    )
    extra = {a: med[a]["logprobs"] - med["grpo"]["logprobs"] for a in ("rlrt", "rlrt_all")}
    rows = {a: res[a]["teacher_rows"][0] for a in ("rlrt", "rlrt_all")}
    print(
        f"correct rollouts {res['rlrt']['correct'][0]:.2f}; teacher forward on "
        f"{rows['rlrt']:.2f} of the rows (rlrt) vs {rows['rlrt_all']:.2f} (rlrt_all); its cost "
        f"(logprobs - grpo's) {extra['rlrt']:.3f}s vs {extra['rlrt_all']:.3f}s"
    )
    ratio = extra["rlrt"] / extra["rlrt_all"] if extra["rlrt_all"] > 0 else float("nan")
    print(f"teacher_cost_ratio_rows_over_all={ratio:.3f}")
    print(f"ratio_rlrt_over_grpo={tot['rlrt'] / tot['grpo']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
