"""Training throughput of one step (tokens/s, TFLOP/s, MFU, peak memory) per layer spec, with
plain transformers as the anchor row, on a random model of a Qwen3 shape (one device).

GPU (issue 12's numbers; < 90 s on one H200 including imports and model builds):
    python benchmarks/train_throughput.py --shape qwen3-0.6b --seq 4096 --device cuda
CPU smoke test (what tests/unit/test_attention_benchmark.py runs):
    python benchmarks/train_throughput.py --shape tiny --seq 64 --device cpu --steps 1 --warmup 1

Cases (`--cases`, default all; `te*` skip with a reason when Transformer Engine is absent):
    hf      transformers `Qwen3ForCausalLM`, attn_implementation="sdpa", bf16 params,
            `model(ids, labels=ids)` (transformers' causal-LM loss), `torch.optim.AdamW`
            (fused on CUDA; states in the params' dtype): what a user gets with plain
            transformers. The ratio column is relative to this row. Pure bf16 weights:
            an Adam update below bf16's resolution (lr 1e-6) is lost.
    hf-amp  the same with fp32 params, `torch.autocast(bf16)` and fp32 AdamW (what the
            transformers Trainer does with bf16=True): fp32 master weights like Megatron's.
    local   Megatron local spec (dense `[s, s]` attention scores; the CPU-test spec)
    torch   Megatron torch spec (PyTorch SDPA flash attention; `megatron/attention.py`)
    te      Megatron Transformer Engine spec, bf16
    te-fp8  the TE spec with FP8 GEMMs (delayed scaling)

Every Megatron case trains exactly as the trainer does: `megatron/train_step.py`'s `Policy`
(bf16 params, megatron DDP with fp32 gradient buffers, distributed optimizer with fp32 main
params and Adam states) and its `train_minibatch`: the packed forward/backward of
`megatron/forward.py` (the LM head only where a log-prob is needed, vocab-parallel log-probs
in chunks) and one optimizer step. Both kinds of row train the same objective: the mean
next-token NLL of all `seq - 1` predicted tokens of `micro-batch` random sequences of `seq`
tokens (Megatron: response = tokens 1..seq-1). `--no-optimizer` times forward + backward only.

Memory: peak allocated bytes during the case minus what was allocated before it (leftovers of
earlier cases do not count), so static memory differs between rows: Megatron keeps fp32
gradients, fp32 main params and fp32 Adam states (~16 bytes/param more than bf16 params) where
the hf row's AdamW keeps bf16 states (~6 bytes/param; hf-amp: fp32 params, grads and states,
16 bytes/param).

MFU = achieved model FLOP/s / dense bf16 peak of the GPU (`--peak-tflops` for unknown GPUs), with
the count of issue 12 (PaLM): FLOPs/token = 6 * N + 12 * layers * hidden * seq, N = non-embedding
params + the LM head (vocab * hidden, counted as a GEMM also when tied). FP8 rows are reported
against the bf16 peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import time

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H20": 148.0, "A100": 312.0, "B200": 2250.0}
CASES = ("hf", "hf-amp", "local", "torch", "te", "te-fp8")


def _peak_bf16(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops
    print(f"# unknown GPU {name!r}: pass --peak-tflops (dense bf16) for MFU")
    return None


def model_config(shape: str, layers: int | None, seq: int):
    """Qwen3 config of `shape` (random weights; the tiny one is the tests' tiny Qwen3)."""
    from transformers import Qwen3Config

    from rlrt_megatron.convert.tiny import tiny_config

    if shape == "tiny":
        cfg = tiny_config("qwen3", vocab_size=512, num_layers=layers or 2)
        cfg.max_position_embeddings = max(seq, cfg.max_position_embeddings)
        return cfg
    return Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_hidden_layers=layers or 28, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, max_position_embeddings=max(seq, 40960), rms_norm_eps=1e-6,
        tie_word_embeddings=True, architectures=["Qwen3ForCausalLM"],
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    )  # fmt: skip


def flops_per_token(hf, seq: int) -> float:
    h, L, hd = hf.hidden_size, hf.num_hidden_layers, hf.head_dim
    nh, nkv, ffn = hf.num_attention_heads, hf.num_key_value_heads, hf.intermediate_size
    per_layer = h * hd * (nh + 2 * nkv) + nh * hd * h + 3 * h * ffn + 2 * h + 2 * hd
    n = L * per_layer + h + hf.vocab_size * h
    return 6 * n + 12 * L * h * seq


class _Meter:
    """Wall time and peak memory of a case on `device`."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def peak_gib(self) -> float | None:
        if not self.cuda:
            return None
        return (self.torch.cuda.max_memory_allocated() - self.base) / 2**30


def _tokens(hf, args, device):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, hf.vocab_size, (args.micro_batch, args.seq), generator=g).to(device)


def _time(step, args, meter) -> float:
    for _ in range(args.warmup):
        step()
    meter.sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    meter.sync()
    return (time.perf_counter() - t0) / args.steps


def run_hf(hf, args, device, amp: bool) -> tuple[float, float | None]:
    import contextlib
    import copy

    import torch
    from transformers import Qwen3ForCausalLM

    meter = _Meter(device)
    dtype = torch.float32 if amp else torch.bfloat16
    with torch.device(device):  # created in its dtype on the device: no extra copy on the way
        model = Qwen3ForCausalLM._from_config(
            copy.deepcopy(hf), attn_implementation="sdpa", dtype=dtype
        )
    assert {p.dtype for p in model.parameters()} == {dtype}
    model.train()
    opt = None
    if args.optimizer:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")
    ids = _tokens(hf, args, device)
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if amp
        else contextlib.nullcontext
    )

    def step():
        with autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
        model.zero_grad(set_to_none=True)

    dt = _time(step, args, meter)
    peak = meter.peak_gib()
    model = opt = None  # freed before the next case
    return dt, peak


def run_megatron(case: str, hf, args, device) -> tuple[float, float | None]:
    import torch

    from rlrt_megatron.config import OptimizerConfig
    from rlrt_megatron.megatron.forward import forward_backward_responses
    from rlrt_megatron.megatron.te import FP8Config
    from rlrt_megatron.megatron.train_step import Policy

    meter = _Meter(device)
    spec = "te" if case.startswith("te") else case
    fp8 = FP8Config(enabled=True, recipe="delayed") if case == "te-fp8" else None
    policy = Policy(
        hf, tp=1, pp=1, optim=OptimizerConfig(lr=1e-6), total_steps=10**6, spec=spec,
        params_dtype=torch.bfloat16, fp8=fp8,
    )  # fmt: skip
    seqs = _tokens(hf, args, "cpu").tolist()
    starts = [1] * len(seqs)
    width, budget = args.seq - 1, args.seq * args.micro_batch
    n_tokens = width * len(seqs)

    def loss_of(logprobs, rows, topk):
        return -logprobs.sum() / n_tokens, {}

    def train_step():
        policy.train_minibatch(seqs, starts, list(range(len(seqs))), width, budget, loss_of)

    def fwd_bwd():  # --no-optimizer: the same packed forward/backward, no optimizer step
        for m in policy.model:
            m.zero_grad_buffer()
        row_tokens, rows = policy._layout(args.seq, budget)
        forward_backward_responses(
            policy.model, seqs, starts,
            lambda mb, o: (-o["logprobs"].sum() / n_tokens, {}),
            token_budget=row_tokens, rows_per_microbatch=rows, response_len=width,
        )  # fmt: skip

    dt = _time(train_step if args.optimizer else fwd_bwd, args, meter)
    peak = meter.peak_gib()
    policy = None  # freed before the next case
    return dt, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", choices=("qwen3-0.6b", "tiny"), default="qwen3-0.6b")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--no-optimizer", dest="optimizer", action="store_false",
                    help="time forward + backward only (no optimizer step)")  # fmt: skip
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch looks: platform picks the CPU
    t_start = time.perf_counter()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA GPU is visible (use --device cpu --shape tiny)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():  # fmt: skip
        os.environ.setdefault(k, v)
    from rlrt_megatron import platform
    from rlrt_megatron.megatron.te import te_available

    platform.init_distributed(tp=1, pp=1)
    device = platform.device()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = _peak_bf16(name, args.peak_tflops) if device.type == "cuda" else None
    hf = model_config(args.shape, args.layers, args.seq)
    fpt = flops_per_token(hf, args.seq)
    results = []
    for case in args.cases:
        if case.startswith("te") and not te_available():
            print(f"# {case}: skipped, transformer_engine is not importable (gpu extra)")
            continue
        try:
            if case.startswith("hf"):
                dt, mem = run_hf(hf, args, device, amp=case == "hf-amp")
            else:
                dt, mem = run_megatron(case, hf, args, device)
        except Exception as e:  # one failing case (e.g. an FP8 recipe) keeps the others
            print(f"# {case}: failed: {type(e).__name__}: {e}")
            continue
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        tok_s = args.micro_batch * args.seq / dt
        results.append({
            "case": case, "tokens_per_s": tok_s, "step_s": dt, "tflops": tok_s * fpt / 1e12,
            "mfu": tok_s * fpt / (peak * 1e12) if peak else None, "peak_gib": mem,
        })  # fmt: skip
    platform.destroy_distributed()

    what = "train step" if args.optimizer else "fwd+bwd"
    print(f"# {name}, {args.shape} ({hf.num_hidden_layers} layers), seq {args.seq}, "
          f"micro-batch {args.micro_batch}, {what}, peak bf16 {peak or '-'} TFLOP/s, "
          f"{time.perf_counter() - t_start:.0f} s total")  # fmt: skip
    print(f"{'case':<8}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}{'vs hf':>8}")
    base = next((r["tokens_per_s"] for r in results if r["case"] == "hf"), None)
    for r in results:
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
        mem = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        ratio = f"x{r['tokens_per_s'] / base:.2f}" if base else "-"
        print(f"{r['case']:<8}{r['tokens_per_s']:>12.0f}{r['tflops']:>10.2f}{mfu:>8}{mem:>10}"
              f"{ratio:>8}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
