"""Peak memory and time: chunked vocab-parallel log-probs vs naive `log_softmax(logits.float())`.

    .venv/bin/python benchmarks/logprobs_memory.py [--tokens 1024 4096 8192] [--vocab 151936]

Every (T, implementation, mode) case runs in its own child process, so one case's allocator
state cannot hide or inflate another's peak. Inputs: bf16 logits [T, V] (the LM head's output
dtype) and int64 targets. Modes: `fwd` = no-grad forward (the `logprobs` phase: student and
teacher log-probs), `fwd+bwd` = forward + backward to the logits (the `update` phase).

How memory is measured:
* CPU: Linux peak resident set size. After the inputs exist (and are touched), the child resets
  the kernel's high-water mark (`echo 5 > /proc/self/clear_refs`), runs the case once, and reads
  `VmHWM` from /proc/self/status. Reported "peak" = VmHWM - VmRSS before the run, i.e. the
  incremental memory above the input logits (and targets). Large tensors are mmap'ed by glibc
  and returned on free, so the high-water mark tracks tensor lifetimes closely.
* GPU (when present): `torch.cuda.max_memory_allocated()` - `memory_allocated()` before the run.
Time: a separate child per (T, mode) runs the implementations interleaved, one warm-up round then
`--repeats` rounds, and reports each one's best (single thread on CPU; interleaving spreads the
load of other processes on a shared machine evenly; each run includes allocating temporaries).

Naive cases whose estimated footprint does not fit in the machine's available memory (with
a margin) are skipped and reported as such instead of swapping or being OOM-killed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

GiB = 2**30


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _make_inputs(t: int, v: int, dev: torch.device):
    logits = torch.empty(t, v, dtype=torch.bfloat16, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    step = 256  # fill in row blocks so no [T, V] fp32 temporary inflates the baseline
    for a in range(0, t, step):
        logits[a : a + step] = (torch.randn(min(step, t - a), v, generator=g, device=dev) * 2).to(
            torch.bfloat16
        )
    target = torch.randint(0, v, (t,), generator=g, device=dev)
    return logits, target


def _run_case(impl: str, mode: str, logits: torch.Tensor, target: torch.Tensor) -> None:
    from rlrt_megatron.megatron.logprobs import vocab_parallel_logprobs

    if mode == "fwd":
        with torch.no_grad():
            if impl == "naive":
                torch.log_softmax(logits.float(), -1).gather(-1, target[:, None]).squeeze(-1)
            else:
                vocab_parallel_logprobs(logits, target)
        return
    x = logits.detach().requires_grad_()
    if impl == "naive":
        lp = torch.log_softmax(x.float(), -1).gather(-1, target[:, None]).squeeze(-1)
    else:
        # `ours`: gradient written into the logits' storage (how forward.py calls it);
        # `ours-copy`: a fresh gradient buffer (the default).
        lp = vocab_parallel_logprobs(x, target, inplace_backward=impl == "ours")
    lp.sum().backward()


def child(args: argparse.Namespace) -> None:
    """`--impl X`: peak memory of one run of X. `--impl a,b,c`: interleaved timing of a, b, c."""
    torch.set_num_threads(1)
    dev = torch.device(args.device)
    logits, target = _make_inputs(args.t, args.vocab, dev)
    impls = args.impl.split(",")
    if len(impls) == 1:
        if dev.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base = _rss_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        _run_case(impls[0], args.mode, logits, target)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = _rss_kib("VmHWM") * 1024 - base
        print(json.dumps({"peak": peak}))
        return
    # Interleaved repeats so that load from other processes on a shared machine hits all
    # implementations alike; the first round is a warm-up (imports, first-touch page faults).
    times: dict[str, list[float]] = {i: [] for i in impls}
    for _ in range(args.repeats + 1):
        for impl in impls:
            t0 = time.perf_counter()
            _run_case(impl, args.mode, logits, target)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[impl].append(time.perf_counter() - t0)
    print(json.dumps({i: min(ts[1:]) for i, ts in times.items()}))


def _naive_estimate(t: int, v: int, mode: str) -> float:
    """Bytes the naive case needs (inputs included): fp32 copy + fp32 log-softmax output,
    plus for backward an fp32 grad of the log-softmax, the fp32 input grad and the bf16 grad."""
    f32 = t * v * 4
    inputs = t * v * 2
    return inputs + (2 * f32 if mode == "fwd" else 3 * f32 + inputs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--t", type=int, help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    import psutil

    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    print(
        f"device={args.device} V={args.vocab} bf16 logits; peak = memory above the inputs "
        f"({'peak RSS via /proc VmHWM' if args.device == 'cpu' else 'max_memory_allocated'}); "
        f"time = best of {args.repeats}, 1 thread"
    )
    header = f"{'T':>6} {'mode':>8} {'impl':>10} {'peak MiB':>10} {'time s':>8}"
    header += f" {'mem naive/x':>12} {'time x/naive':>13}"
    print(header)

    def run_child(t: int, mode: str, impl: str) -> dict | str:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--t", str(t)]
        cmd += ["--impl", impl, "--mode", mode, "--vocab", str(args.vocab)]
        cmd += ["--repeats", str(args.repeats), "--device", args.device]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            return f"failed: {out.stderr.strip()[-300:]}"
        return json.loads(out.stdout.strip().splitlines()[-1])

    for t in args.tokens:
        for mode in args.modes:
            impls = ["naive", "ours"] + (["ours-copy"] if mode == "fwd+bwd" else [])
            need = _naive_estimate(t, args.vocab, mode)
            avail = psutil.virtual_memory().available
            if args.device == "cpu" and need > 0.8 * avail:
                print(
                    f"{t:>6} {mode:>8} {'naive':>10}   skipped: needs ~{need / GiB:.1f} GiB, "
                    f"{avail / GiB:.1f} GiB available"
                )
                impls.remove("naive")
            peaks = {i: run_child(t, mode, i) for i in impls}
            times = run_child(t, mode, ",".join(impls))
            for impl in impls:
                peak = peaks[impl]
                if isinstance(peak, str) or isinstance(times, str):
                    print(
                        f"{t:>6} {mode:>8} {impl:>10}   {peak if isinstance(peak, str) else times}"
                    )
                    continue
                line = f"{t:>6} {mode:>8} {impl:>10} {peak['peak'] / 2**20:>10.1f}"
                line += f" {times[impl]:>8.3f}"
                if impl != "naive" and "naive" in impls and not isinstance(peaks["naive"], str):
                    line += f" {peaks['naive']['peak'] / max(peak['peak'], 1):>12.1f}"
                    line += f" {times[impl] / times['naive']:>13.2f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
