"""Peak memory and time of per-token log-probs from hidden states: the LM head fused with the
log-probs (`megatron/lm_head.py`) vs naive `log_softmax(hidden @ W.T)` and library kernels.

GPU (H200; the issue's goals; ~10 s; `--device cuda` alone means the same):

    python benchmarks/logprobs_memory.py --device cuda --T 8192,32768 --H 4096 --V 151936 \\
        --dtype bf16

CPU (the memory acceptance check; a few minutes on one core):

    .venv/bin/python benchmarks/logprobs_memory.py --device cpu --T 8192 --H 1024 --V 151936 \\
        --dtype fp32 --modes fwd

Inputs: hidden `[T, H]`, the LM-head weight `[V, H]` (one TP rank holding the whole vocabulary),
int64 targets, and for `fwd+bwd` per-token weights w: the loss is `(logp * w).sum()`, back-
propagated to the hidden states and the weight (both gradients are included in the peak).
Rows (each optional one only when importable / applicable):

* `naive`   - `log_softmax((hidden @ W.T).float())` gathered at the targets (full fp32 logits);
* `logits`  - the previous path: bf16 logits from the LM head matmul, then the chunked
              `vocab_parallel_logprobs` (gradient written into the logits' storage);
* `fused`   - `lm_head_logprobs(impl="fused")`: cuBLAS blocks + Triton kernels (CUDA);
* `chunked` - `lm_head_logprobs(impl="chunked")`: the same blocks with torch ops (the CPU path);
* `liger`   - Liger's fused linear cross entropy (`reduction="none"` forward; it takes no
              per-token loss weights, so `fwd+bwd` backpropagates `reduction="sum"`: same work);
* `cce`     - cut-cross-entropy's `linear_cross_entropy(reduction="none")`.

Peak = memory above the inputs: on CUDA `max_memory_allocated()` minus the allocation before
the run (one process, cache emptied between cases); on CPU the Linux peak RSS of a child
process per case (`VmHWM` after resetting it through /proc/self/clear_refs, minus `VmRSS`
before the run). Time: CUDA = best of `--repeats` after a warm-up; CPU = the single measured
run (one thread). `err` = max |logp - fp32 reference| over the first 256 tokens (fwd rows).
Naive cases that would not fit in the available memory are skipped (CPU) and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

GiB, MiB = 2**30, 2**20
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------
# Inputs and the implementations
# ----------------------------------------------------------------------------------------------
def make_inputs(t: int, h: int, v: int, dtype: torch.dtype, dev: torch.device):
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(t, h, generator=g, device=dev, dtype=torch.float32).to(dtype)
    weight = torch.empty(v, h, device=dev, dtype=dtype)
    for a in range(0, v, 8192):  # in blocks: no [V, H] fp32 temporary inflating the baseline
        b = min(v, a + 8192)
        weight[a:b] = (torch.randn(b - a, h, generator=g, device=dev) * h**-0.5 * 2).to(dtype)
    target = torch.randint(0, v, (t,), generator=g, device=dev)
    w = torch.randn(t, generator=g, device=dev)
    return hidden, weight, target, w


def available_impls(dev: torch.device) -> list[str]:
    impls = ["naive", "logits"]
    if dev.type == "cuda":
        from rlrt_megatron.megatron.lm_head import resolve_impl

        if resolve_impl("fused", dev) == "fused":
            impls.append("fused")
    impls.append("chunked")
    try:
        import liger_kernel  # noqa: F401

        if dev.type == "cuda":
            impls.append("liger")
    except ImportError:
        pass
    try:
        import cut_cross_entropy  # noqa: F401

        if dev.type == "cuda":
            impls.append("cce")
    except ImportError:
        pass
    return impls


def run_case(impl: str, mode: str, hidden, weight, target, w) -> torch.Tensor:
    """One forward (no grad) or forward + backward; returns the log-probs (detached)."""
    from rlrt_megatron.megatron.lm_head import lm_head_logprobs
    from rlrt_megatron.megatron.logprobs import vocab_parallel_logprobs

    grad = mode == "fwd+bwd"
    h = hidden.detach().requires_grad_(grad)
    wt = weight.detach().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        if impl == "naive":
            lp = torch.log_softmax((h @ wt.t()).float(), -1).gather(-1, target[:, None])[:, 0]
        elif impl == "logits":
            lp = vocab_parallel_logprobs(h @ wt.t(), target, inplace_backward=True)
        elif impl in ("fused", "chunked"):
            lp = lm_head_logprobs(h, wt, target, impl=impl)
        elif impl == "liger":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            if grad:
                loss = liger_fused_linear_cross_entropy(h, wt, target, reduction="sum")
                loss.backward()
                return loss.detach()
            lp = -liger_fused_linear_cross_entropy(h, wt, target, reduction="none")
        elif impl == "cce":
            from cut_cross_entropy import linear_cross_entropy

            lp = -linear_cross_entropy(h, wt, target, reduction="none")
        else:
            raise ValueError(impl)
        if grad:
            (lp * w).sum().backward()
    return lp.detach().float()


def fp32_reference(hidden, weight, target, n: int = 256) -> torch.Tensor:
    z = hidden[:n].float() @ weight.float().t()
    return torch.log_softmax(z, -1).gather(-1, target[:n, None])[:, 0]


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# CUDA: one process, every case in turn
# ----------------------------------------------------------------------------------------------
def bench_cuda(args, dev) -> list[dict]:
    rows = []
    dtype = DTYPES[args.dtype]
    for t in args.T:
        hidden, weight, target, w = make_inputs(t, args.H, args.V, dtype, dev)
        ref = fp32_reference(hidden, weight, target)
        for mode in args.modes:
            for impl in args.impls:
                row = dict(T=t, mode=mode, impl=impl)
                try:
                    torch.cuda.empty_cache()
                    _sync(dev)
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    lp = run_case(impl, mode, hidden, weight, target, w)
                    _sync(dev)
                    row["peak"] = torch.cuda.max_memory_allocated() - base
                    if mode == "fwd":
                        row["err"] = float((lp[: ref.numel()] - ref).abs().max())
                        row["max_logp"] = float(lp.max())
                    del lp
                    times = []
                    for i in range(args.repeats + 1):
                        _sync(dev)
                        t0 = time.perf_counter()
                        run_case(impl, mode, hidden, weight, target, w)
                        _sync(dev)
                        if i:
                            times.append(time.perf_counter() - t0)
                    row["time"] = min(times)
                except Exception as e:  # noqa: BLE001 - one failing row must not end the table
                    row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                torch.cuda.empty_cache()
                rows.append(row)
                print_row(row, rows)
        del hidden, weight, target, w
    return rows


# ----------------------------------------------------------------------------------------------
# CPU: a child process per case (peak RSS needs a fresh process)
# ----------------------------------------------------------------------------------------------
def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def cpu_child(args) -> None:
    torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    hidden, weight, target, w = make_inputs(args.T[0], args.H, args.V, DTYPES[args.dtype], dev)
    ref = fp32_reference(hidden, weight, target) if args.modes[0] == "fwd" else None
    base = _rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    lp = run_case(args.impls[0], args.modes[0], hidden, weight, target, w)
    out = {"time": time.perf_counter() - t0, "peak": _rss("VmHWM") - base}
    if ref is not None:
        out["err"] = float((lp[: ref.numel()] - ref).abs().max())
        out["max_logp"] = float(lp.max())
    print(json.dumps(out))


def naive_bytes(t: int, v: int, mode: str) -> int:
    """What the naive case needs above the inputs: logits + fp32 copy/log-softmax (+ grads)."""
    f32 = t * v * 4
    return 2 * f32 if mode == "fwd" else 4 * f32


def bench_cpu(args) -> list[dict]:
    import psutil

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    rows = []
    for t in args.T:
        for mode in args.modes:
            for impl in args.impls:
                row = dict(T=t, mode=mode, impl=impl)
                need = naive_bytes(t, args.V, mode)
                if impl == "naive" and need > 0.8 * psutil.virtual_memory().available:
                    row["error"] = f"skipped: needs ~{need / GiB:.1f} GiB (estimate)"
                    row["est_peak"] = need
                else:
                    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--device", "cpu"]
                    cmd += ["--T", str(t), "--H", str(args.H), "--V", str(args.V)]
                    cmd += ["--dtype", args.dtype, "--modes", mode, "--impls", impl]
                    cmd += ["--threads", str(args.threads)]
                    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                    if res.returncode:
                        row["error"] = f"failed: {res.stderr.strip()[-200:]}"
                    else:
                        row.update(json.loads(res.stdout.strip().splitlines()[-1]))
                rows.append(row)
                print_row(row, rows)
    return rows


# ----------------------------------------------------------------------------------------------
def print_row(row: dict, rows: list[dict]) -> None:
    line = f"{row['T']:>6} {row['mode']:>8} {row['impl']:>8}"
    if "error" in row:
        print(f"{line}   {row['error']}", flush=True)
        return
    naive = next(
        (
            r
            for r in rows
            if r["impl"] == "naive" and r["T"] == row["T"] and r["mode"] == row["mode"]
        ),
        None,
    )
    peak = row["peak"]
    line += f" {peak / MiB:>10.1f} {row['time'] * 1e3:>9.1f}"
    if naive is not None and row is not naive:
        n_peak = naive.get("peak", naive.get("est_peak"))
        est = "~" if "peak" not in naive else " "
        line += f" {est}{n_peak / max(peak, 1):>9.1f}x"
        line += f" {row['time'] / naive['time']:>9.2f}" if "time" in naive else f" {'-':>9}"
    else:
        line += f" {'':>11} {'':>9}"
    if "err" in row:
        line += f" {row['err']:>9.1e} {row['max_logp']:>8.1e}"
    print(line, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--T", default=None, help="token counts, comma-separated (default: CUDA "
                   "8192,32768; CPU 1024,8192)")  # fmt: skip
    p.add_argument("--H", type=int, default=None, help="hidden size (default: CUDA 4096; CPU 1024)")
    p.add_argument("--V", type=int, default=151_936)
    p.add_argument("--dtype", default=None, help="bf16 | fp32 (default: bf16 on CUDA, else fp32)")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--impls", default="", help="subset of the rows (default: all available)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after a warm-up (CUDA)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    args.T = [int(x) for x in str(args.T or ("8192,32768" if cuda else "1024,8192")).split(",")]
    args.H = args.H or (4096 if cuda else 1024)
    args.modes = args.modes.split(",")
    args.dtype = args.dtype or ("bf16" if dev.type == "cuda" else "fp32")
    args.impls = args.impls.split(",") if args.impls else available_impls(dev)
    if args.child:
        cpu_child(args)
        return
    print(
        f"device={dev} H={args.H} V={args.V} {args.dtype}; peak = memory above the inputs "
        f"({'max_memory_allocated' if dev.type == 'cuda' else 'peak RSS, child per case'}); "
        f"fwd+bwd = (logp * w).sum() backward to hidden and weight; ratios vs naive"
    )
    print(
        f"{'T':>6} {'mode':>8} {'impl':>8} {'peak MiB':>10} {'time ms':>9} {'naive/x':>11} "
        f"{'x/naive':>9} {'err':>9} {'max logp':>8}"
    )
    t0 = time.perf_counter()
    if dev.type == "cuda":
        bench_cuda(args, dev)
    else:
        bench_cpu(args)
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
