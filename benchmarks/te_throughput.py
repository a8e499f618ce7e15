"""GPU only: training throughput (tokens/s) and MFU of the local vs Transformer Engine layer
specs, in bf16 and FP8, on a random Qwen3-0.6B-shaped Megatron model (one GPU).

    .venv/bin/python benchmarks/te_throughput.py [--seq 4096] [--micro-batch 1] [--steps 10]
        [--layers 28] [--cases local te te_fp8_delayed te_fp8_current] [--json out.json]

Each case builds the model (bf16 params), then times `--steps` forward+backward passes of the
token-level cross-entropy on random tokens after `--warmup` untimed ones (no optimizer step:
the layer spec changes the forward/backward, not Adam). Numbers are per GPU.

MFU = achieved model FLOP/s / peak dense bf16 FLOP/s of the GPU, with the PaLM count
    FLOPs/token = 6 * N_params(non-embedding, + LM head) + 12 * layers * hidden * seq
(backward = 2x forward; attention scores counted without causal halving). FP8 cases are
reported against the same bf16 peak (the usual convention) and the FP8 peak in a second column.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import time

import torch

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H20": 148.0, "A100": 312.0, "B200": 2250.0}


def _peak_bf16(name: str, override: float | None) -> float:
    if override:
        return override
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops
    raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops (dense bf16)")


def qwen3_06b_config(layers: int, seq: int):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=max(seq, 4096), rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        architectures=["Qwen3ForCausalLM"],
    )  # fmt: skip


def flops_per_token(model, hf, seq: int) -> float:
    n = sum(p.numel() for name, p in model.named_parameters() if "embedding" not in name)
    n += hf.vocab_size * hf.hidden_size  # tied LM head: counted as a GEMM, not as a parameter
    return 6 * n + 12 * hf.num_hidden_layers * hf.hidden_size * seq


def run_case(case: str, hf, args) -> dict:
    from rlrt_megatron.megatron.model import build_model
    from rlrt_megatron.megatron.te import FP8Config, fp8_transformer_kwargs

    spec = "local" if case == "local" else "te"
    fp8 = None
    if case.startswith("te_fp8_"):
        fp8 = FP8Config(enabled=True, recipe=case.removeprefix("te_fp8_"))
    model = build_model(
        hf, spec=spec, params_dtype=torch.bfloat16, **fp8_transformer_kwargs(fp8, spec=spec)
    )[0]
    model.train()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, hf.vocab_size, (args.micro_batch, args.seq + 1), generator=g).cuda()
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    pos = torch.arange(args.seq, device="cuda").unsqueeze(0).expand_as(inputs)

    def step():
        loss = model(inputs, pos, None, labels=labels).float().mean()
        loss.backward()
        for p in model.parameters():
            p.grad = None
            if hasattr(p, "main_grad"):
                p.main_grad = None

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    tok_s = args.micro_batch * args.seq / dt
    achieved = tok_s * flops_per_token(model, hf, args.seq)
    out = {
        "case": case,
        "tokens_per_s": tok_s,
        "step_s": dt,
        "tflops": achieved / 1e12,
        "mfu_bf16_peak": achieved / (args.peak * 1e12),
        "mfu_fp8_peak": achieved / (2 * args.peak * 1e12) if fp8 else None,
        "max_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    model = None  # free the weights before the next case
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cases", nargs="+", default=["local", "te", "te_fp8_delayed",
                                                   "te_fp8_current"])  # fmt: skip
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("te_throughput.py needs a CUDA GPU (and the gpu extra for TE cases)")
    name = torch.cuda.get_device_name()
    args.peak = _peak_bf16(name, args.peak_tflops)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():  # fmt: skip
        os.environ.setdefault(k, v)
    from rlrt_megatron import platform
    from rlrt_megatron.megatron.te import te_available

    platform.init_distributed(tp=1, pp=1)
    hf = qwen3_06b_config(args.layers, args.seq)
    results = []
    for case in args.cases:
        if case != "local" and not te_available():
            print(f"# {case}: skipped, transformer_engine not importable (gpu extra)")
            continue
        try:
            results.append(run_case(case, hf, args))
        except Exception as e:  # one failing case (e.g. FP8 recipe unsupported) keeps the rest
            print(f"# {case}: failed: {type(e).__name__}: {e}")
    platform.destroy_distributed()

    print(f"# {name}, Qwen3-0.6B-shaped ({args.layers} layers), seq {args.seq}, "
          f"micro-batch {args.micro_batch}, peak bf16 {args.peak:g} TFLOP/s")  # fmt: skip
    print(f"{'case':<18}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}{'MFU(fp8)':>10}{'GiB':>8}")
    base = next((r["tokens_per_s"] for r in results if r["case"] == "local"), None)
    for r in results:
        fp8_mfu = f"{r['mfu_fp8_peak']:.3f}" if r["mfu_fp8_peak"] is not None else "-"
        print(
            f"{r['case']:<18}{r['tokens_per_s']:>12.0f}{r['tflops']:>10.1f}"
            f"{r['mfu_bf16_peak']:>8.3f}{fp8_mfu:>10}{r['max_mem_gib']:>8.1f}"
            + (f"   x{r['tokens_per_s'] / base:.2f} vs local" if base else "")
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": name, "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
