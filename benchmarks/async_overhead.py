"""Step time of asynchronous rollouts divided by synchronous ones, the engine in its own process.

    python benchmarks/async_overhead.py [--steps 8] [--seeds 1,2] [--plot reward.png]
                                        [--run-dir runs/bench_async] [dotted=value ...]

Runs the tiny demo twice from the same warmed model and seed, both with the local engine in its
own process (`rollout.local_process=true`): `rollout.async_steps=0` (every step waits for its
rollouts) and `rollout.async_steps=1` (step k+1's batch is sampled while step k trains). The
first two steps warm up; the median `time/step` of the rest is compared. With generation and
training taking similar time the ideal ratio is ~0.5 (max instead of sum); the goal is <= 0.65.
Needs two free CPU cores (one for the trainer, one for the engine process). With several
`--seeds` every seed runs both modes (`train.seed` and `rollout.seed`), the medians pool all
seeds, and `--plot` draws the reward curves of both modes (the README's async-vs-sync figure).
Prints the per-phase medians, the mean reward of the last half of the steps per mode and seed,
and `ratio_async_over_sync=<float>` on its last line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

KEYS = ("time/rollout", "time/reward", "time/logprobs", "time/update", "time/sync")


def run_mode(async_steps: int, seed: int, args: argparse.Namespace) -> list[dict]:
    from recipes import get_recipe
    from rlrt_megatron.trainer.cli import _prepare_demo_model
    from rlrt_megatron.trainer.train import train

    model_dir = os.path.join(args.run_dir, f"model_seed{seed}")  # the warm-up uses train.seed
    cfg = get_recipe(
        "tiny_demo",
        [
            f"logging.run_dir={os.path.join(args.run_dir, f'async{async_steps}_seed{seed}')}",
            f"model.hf_path={os.path.join(model_dir, 'hf')}",
            f"model.megatron_ckpt={os.path.join(model_dir, 'megatron')}",
            "checkpoint.resume=none",
            "checkpoint.save_final=false",
            "logging.console=none",
            "logging.tensorboard=false",
            "eval.every=0",
            "rollout.local_process=true",
            f"rollout.async_steps={async_steps}",
            f"train.steps={args.steps}",
            f"train.seed={seed}",
            f"rollout.seed={seed}",
            *args.overrides,
        ],
    )
    _prepare_demo_model(cfg, model_dir)
    return train(cfg)["metrics"]


def plot(curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    colors = {0: "tab:blue", 1: "tab:orange"}
    for (mode, seed), rows in sorted(curves.items()):
        label = f"{'async (async_steps=1)' if mode else 'sync'}, seed {seed}"
        ax.plot([r["step"] for r in rows], [r["reward/mean"] for r in rows], color=colors[mode],
                alpha=0.85, lw=1.2, ls="-" if seed == min(s for _, s in curves) else "--",
                label=label)  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("reward/mean")
    ax.set_title("tiny demo: asynchronous vs synchronous rollouts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the medians")
    p.add_argument("--seeds", default="1234", help="comma-separated seeds")
    p.add_argument("--plot", default="", help="write the reward curves to this PNG")
    p.add_argument("--run-dir", default="runs/bench_async")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    seeds = [int(x) for x in args.seeds.split(",") if x]
    curves = {(mode, seed): run_mode(mode, seed, args) for seed in seeds for mode in (0, 1)}
    timed = {
        mode: [r for (m, _), rows in curves.items() if m == mode for r in rows[args.warmup :]]
        for mode in (0, 1)
    }
    med = {
        mode: {k: statistics.median(r.get(k, 0.0) for r in rows) for k in (*KEYS, "time/step")}
        for mode, rows in timed.items()
    }
    print(f"\nmedian seconds over steps {args.warmup + 1}..{args.steps}, seeds {seeds}")
    print(f"{'phase':<20}{'sync':>10}{'async':>10}")
    for k in (*KEYS, "time/step"):
        print(f"{k:<20}{med[0][k]:>10.3f}{med[1][k]:>10.3f}")
    gen, step0 = med[0]["time/rollout"], med[0]["time/step"]
    print(f"sync: generation {gen:.3f}s of a {step0:.3f}s step ({gen / step0:.0%})")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average at the end: {load} on {os.cpu_count()} CPUs (timings need 2 free cores)")
    half = args.steps // 2
    for (mode, seed), rows in sorted(curves.items()):
        last = [r["reward/mean"] for r in rows[half:]]
        print(
            f"reward/mean async_steps={mode} seed={seed}: first {rows[0]['reward/mean']:.3f}, "
            f"mean of steps {half + 1}..{args.steps} {sum(last) / len(last):.3f}"
        )
    if args.plot:
        plot(curves, args.plot)
    # the fastest step of each mode: the least disturbed by other jobs on a shared machine
    fastest = {mode: min(r["time/step"] for r in rows) for mode, rows in timed.items()}
    print(
        f"fastest step: sync {fastest[0]:.3f}s, async {fastest[1]:.3f}s, "
        f"ratio {fastest[1] / fastest[0]:.3f}"
    )
    print(f"ratio_async_over_sync={med[1]['time/step'] / step0:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
