"""Long-tail rollouts: sync vs bounded staleness vs partial rollouts, with and without DP balancing.

    python benchmarks/long_tail.py [--steps 12] [--warmup 2] [--seeds 1234] [--dp 2]
                                   [--modes sync,k1,partial2] [--run-dir runs/bench_long_tail]
                                   [dotted=value ...]

Workload: the tiny demo with `rollout.local_length_tail=true`, a length-controlled mode of the
local engine: each rollout stops at a length drawn from its own seed (80% within
max_new_tokens/8, 15% within /2, 5% at the limit) or at eos. A synchronous step waits for its
longest rollout; partial rollouts take the first groups to finish.

Modes, each a `rlrt train` run from the same warmed model (one per seed), DP ranks via
`torch.distributed.run`:
  sync      rollout.max_staleness=0
  k1        rollout.max_staleness=1                       (the old async_steps=1)
  partial2  rollout.max_staleness=2 rollout.partial=true
each at DP=`--dp` with `train.balance_dp` true and false (DP balancing rows only when --dp > 1).

Per mode (the steps after `--warmup`, all seeds pooled): median step time, tokens trained per
second (prompt + response tokens of the trained batches / wall time of those steps), the
trainer's idle share (time waiting for rollouts / step time; the engine's own idle time is not
measured), token staleness (mean, max), the DP token balance (max/mean of the per-rank token
counts) and the mean reward of the last half of the steps. Prints ratios to sync, and the load
average: the machine may be shared, so timings carry that noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

MODES = {
    "sync": ["rollout.max_staleness=0"],
    "k1": ["rollout.max_staleness=1"],
    "partial2": ["rollout.max_staleness=2", "rollout.partial=true"],
}
WORKLOAD = [
    "rollout.local_length_tail=true",
    "rollout.max_new_tokens=192",
    "rollout.group_size=8",
    "train.prompts_per_step=8",
    "train.mini_batch_prompts=8",
    "rollout.local_process=true",
    "checkpoint.resume=none",
    "checkpoint.save_final=false",
    "checkpoint.save_every=0",
    "logging.console=none",
    "logging.tensorboard=false",
    "eval.every=0",
]


def prepare_model(seed: int, run_dir: str) -> str:
    from recipes import get_recipe
    from rlrt_megatron.trainer.cli import _prepare_demo_model

    model_dir = os.path.join(run_dir, f"model_seed{seed}")
    cfg = get_recipe("tiny_demo", [f"train.seed={seed}", "checkpoint.resume=none"])
    _prepare_demo_model(cfg, model_dir)
    return model_dir


def run(mode: str, balance: bool, seed: int, model_dir: str, args: argparse.Namespace) -> list:
    name = f"{mode}_bal{int(balance)}_seed{seed}"
    run_dir = os.path.join(args.run_dir, name)
    overrides = [
        *WORKLOAD, *MODES[mode], f"train.balance_dp={str(balance).lower()}",
        f"train.steps={args.steps}", f"train.seed={seed}", f"rollout.seed={seed}",
        f"model.hf_path={os.path.join(model_dir, 'hf')}",
        f"model.megatron_ckpt={os.path.join(model_dir, 'megatron')}",
        f"logging.run_dir={run_dir}", *args.overrides,
    ]  # fmt: skip
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              f"--nproc_per_node={args.dp}"] if args.dp > 1 else [sys.executable]  # fmt: skip
    cmd = [*launch, "-m", "rlrt_megatron.cli", "train", "--recipe", "tiny_demo", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stderr[-4000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def summarize(rows: list[dict], warmup: int, steps: int) -> dict[str, float]:
    timed = [r for r in rows if r["step"] > warmup]
    wall = sum(r["time/step"] for r in timed)
    tokens = sum(r["throughput/tokens_per_s"] * r["time/step"] for r in timed)
    half = [r["reward/mean"] for r in rows if r["step"] > steps // 2]
    return {
        "step_s": statistics.median(r["time/step"] for r in timed),
        "tokens_per_s": tokens / max(wall, 1e-9),
        "idle": sum(r.get("time/rollout", 0.0) for r in timed) / max(wall, 1e-9),
        "stale_mean": statistics.mean(r.get("rollout/staleness_mean", 0.0) for r in timed),
        "stale_max": max(r.get("rollout/staleness_max", 0.0) for r in timed),
        "dp_max_over_mean": statistics.mean(
            r.get("train/dp_tokens_max_over_mean", 1.0) for r in timed
        ),
        "resp_len": statistics.mean(r["response/length_mean"] for r in timed),
        "reward_last_half": sum(half) / max(len(half), 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timings")
    p.add_argument("--seeds", default="1234", help="comma-separated seeds")
    p.add_argument("--dp", type=int, default=2, help="data-parallel ranks")
    p.add_argument("--modes", default="sync,k1,partial2")
    p.add_argument("--balance", default="true,false", help="train.balance_dp values to run")
    p.add_argument(
        "--model-seed",
        type=int,
        default=None,
        help="warm one model with this seed for every run (default: one per seed)",
    )
    p.add_argument("--run-dir", default="runs/bench_long_tail")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    balances = [b.strip().lower() == "true" for b in args.balance.split(",") if b]
    if args.model_seed is not None:
        shared = prepare_model(args.model_seed, args.run_dir)
        models = dict.fromkeys(seeds, shared)
    else:
        models = {s: prepare_model(s, args.run_dir) for s in seeds}
    res: dict[tuple[str, bool], dict] = {}
    rewards: dict[tuple[str, bool], list[float]] = {}
    for mode in modes:
        for bal in balances:
            per_seed = [summarize(run(mode, bal, s, models[s], args), args.warmup, args.steps)
                        for s in seeds]  # fmt: skip
            res[mode, bal] = {k: statistics.mean(x[k] for x in per_seed) for k in per_seed[0]}
            rewards[mode, bal] = [x["reward_last_half"] for x in per_seed]
    head = ("mode", "balance_dp", "step_s", "tokens/s", "idle", "stale_mean", "stale_max",
            "dp_max/mean", "resp_len", "reward", "x sync tok/s")  # fmt: skip
    print(f"\nDP={args.dp}, steps {args.warmup + 1}..{args.steps}, seeds {seeds}")
    print("".join(f"{h:>13}" for h in head))
    for (mode, bal), r in res.items():
        base = res.get(("sync", bal)) or next(iter(res.values()))
        print(
            f"{mode:>13}{str(bal):>13}{r['step_s']:>13.3f}{r['tokens_per_s']:>13.0f}"
            f"{r['idle']:>13.2f}{r['stale_mean']:>13.2f}{r['stale_max']:>13.0f}"
            f"{r['dp_max_over_mean']:>13.3f}{r['resp_len']:>13.1f}"
            f"{r['reward_last_half']:>13.3f}{r['tokens_per_s'] / base['tokens_per_s']:>13.2f}"
        )
    for key, vals in rewards.items():
        print(f"reward (mean of the last half) {key[0]} balance_dp={key[1]}: "
              + ", ".join(f"{v:.3f}" for v in vals))  # fmt: skip
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average at the end: {load} on {os.cpu_count()} CPUs")
    if ("sync", True) in res and ("partial2", True) in res:
        ratio = res["partial2", True]["tokens_per_s"] / res["sync", True]["tokens_per_s"]
        print(f"ratio_partial2_over_sync_tokens_per_s={ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
