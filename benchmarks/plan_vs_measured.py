"""`rlrt plan`'s predicted peak vs the memory a real training step allocates.

    python benchmarks/plan_vs_measured.py --device cuda     # Qwen3-0.6B and -1.7B shapes, H200
    python benchmarks/plan_vs_measured.py --device cpu      # tiny shape: a smoke test

Builds each model (random init, bf16 on GPU, `--spec auto`: what `model.spec=auto` resolves to,
`torch` (SDPA) on a GPU without Transformer Engine; `--spec local,torch` for both) through the
trainer's `Policy` (DDP + distributed optimizer, torch
AdamW), takes one warm-up step (Adam allocates its state), then measures one training step of
`--tokens` tokens per micro-batch (rows of `--row-len` tokens, 64 of prompt) with
`torch.cuda.max_memory_allocated`, and prints per model and token budget

    RESULT plan_<model>_<tokens> predicted_gib=.. measured_gib=.. ratio=..

predicted = the planner's peak without its fixed CUDA-context/allocator reserve (which
`max_memory_allocated` does not see); ratio = predicted / measured. On CPU the measured column is
the static bytes megatron allocated (weights, grad buffer, optimizer state), which must equal the
planner's exactly; the activations are not measurable there.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from rlrt_megatron.launch.plan import (  # noqa: E402
    BUILTIN_SHAPES,
    GIB,
    RESERVE_GIB,
    Layout,
    ModelShape,
    Settings,
    activation_bytes_per_token,
    lm_head_bytes,
    predict,
    static_bytes,
)

PROMPT = 64


def hf_config(shape: ModelShape):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        tie_word_embeddings=shape.tied,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        architectures=["Qwen3ForCausalLM"],
    )


def train_step(policy, tokens: int, row_len: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = max(1, tokens // row_len)
    seqs = [torch.randint(0, policy.true_vocab, (row_len,), generator=g).tolist() for _ in range(n)]
    total = float(n * (row_len - PROMPT))

    def loss_of(lp, _rows, _tk):
        return -lp.sum() / total, {}

    return policy.train_minibatch(
        seqs, [PROMPT] * n, list(range(n)), row_len - PROMPT, tokens, loss_of
    )


def run(
    name: str, shape: ModelShape, budgets: list[int], row_len: int, device: str, spec: str
) -> None:
    from rlrt_megatron.config import OptimizerConfig
    from rlrt_megatron.megatron.train_step import Policy

    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    t0 = time.perf_counter()
    policy = Policy(
        hf_config(shape), tp=1, pp=1, optim=OptimizerConfig(lr=1e-6), total_steps=10,
        use_distributed_optimizer=True, spec=spec, params_dtype=dtype,
    )  # fmt: skip
    train_step(policy, budgets[0], row_len, seed=0)  # Adam state allocated from here on
    if cuda:
        # where the peak is: forward/backward vs the optimizer step (diagnostics)
        peaks: dict[str, float] = {}
        opt_step = policy.optimizer.step

        def step_with_peaks():
            torch.cuda.synchronize()
            peaks["fwd_bwd"] = torch.cuda.max_memory_allocated() / GIB
            torch.cuda.reset_peak_memory_stats()
            out = opt_step()
            torch.cuda.synchronize()
            peaks["optimizer_step"] = torch.cuda.max_memory_allocated() / GIB
            return out

        policy.optimizer.step = step_with_peaks
        torch.cuda.synchronize()
        st = static_bytes(shape, tp=1, pp=1, dp=1, stage=0, distributed=True, param_bytes=2)
        print(
            f"# {name} static: allocated_gib={torch.cuda.memory_allocated() / GIB:.3f} "
            f"predicted_gib={(st.weights + st.grads + st.optimizer) / GIB:.3f}",
            flush=True,
        )
    for tokens in budgets:
        settings = Settings(
            spec=spec,
            params_dtype="bfloat16" if cuda else "float32",
            distributed_optimizer=True,
            tokens_per_microbatch=tokens,
            row_len=row_len,
        )
        plan = predict(shape, Layout(1, 1, 1, 1), settings, limit_gib=1e9)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            train_step(policy, tokens, row_len, seed=tokens)
            torch.cuda.synchronize()
            measured = max(peaks.values())
            static_now = st.weights + st.grads + st.optimizer
            head = lm_head_bytes(shape, tp=1, tokens=tokens, act_bytes=2)
            per_layer = (peaks["fwd_bwd"] * GIB - static_now - head) / (tokens * shape.layers)
            pred_layer = activation_bytes_per_token(
                shape, tp=1, act_bytes=2, spec=spec, row_len=row_len
            )
            print(f"# {name} tokens={tokens} measured peaks: "
                  + " ".join(f"{k}={v:.3f}" for k, v in peaks.items())
                  + f" -> {per_layer:.0f} B/token/layer (predicted "
                  + f"{pred_layer:.0f})",
                  flush=True)  # fmt: skip
            predicted = plan.peak_gib - RESERVE_GIB
        else:
            st = static_bytes(shape, tp=1, pp=1, dp=1, stage=0, distributed=True, param_bytes=4)
            predicted = (st.weights + st.grads + st.optimizer) / GIB
            opt = policy.optimizer.chained_optimizers[0]
            measured = sum(
                b.grad_data.numel() * 4 + b.param_data.numel() * 4
                for m in policy.model
                for b in m.buffers
            )
            measured += sum(
                v.numel() * v.element_size()
                for st_ in opt.optimizer.state.values()
                for k, v in st_.items()
                if k != "step"
            )
            measured /= GIB
            train_step(policy, tokens, row_len, seed=tokens)
        rows = " ".join(f"{re.sub('[^a-z]+', '_', k.split(' (')[0].lower())}={v:.2f}"
                        for k, v in plan.rows.items() if v > 0)  # fmt: skip
        print(f"# {name} tokens={tokens} row_len={row_len}: {rows}", flush=True)
        print(
            f"RESULT plan_{name}_{tokens} predicted_gib={predicted:.3f} "
            f"measured_gib={measured:.3f} ratio={predicted / measured:.3f}",
            flush=True,
        )
    del policy
    if cuda:
        torch.cuda.empty_cache()
    print(f"# {name}: {time.perf_counter() - t0:.1f} s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--models", default="qwen3-0.6b,qwen3-1.7b", help="built-in shapes (cuda)")
    ap.add_argument("--tokens", default="4096,8192", help="token budgets per micro-batch")
    ap.add_argument("--row-len", default="1024", help="tokens per sequence (comma list)")
    ap.add_argument("--spec", default="auto", help="layer specs (comma list): auto|local|torch")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no GPU visible", file=sys.stderr)
        return 2
    models, row_lens = args.models.split(","), [int(r) for r in args.row_len.split(",")]
    specs = args.spec.split(",")
    if args.device == "cuda" and len(models) * len(row_lens) * len(specs) > 1:
        # one process per model: nothing of the previous model stays allocated
        for sp in specs:
            for m in models:
                for r in row_lens:
                    cmd = [sys.executable, os.path.abspath(__file__), "--device", "cuda",
                           "--models", m, "--tokens", args.tokens, "--row-len", str(r),
                           "--spec", sp]  # fmt: skip
                    if subprocess.run(cmd).returncode != 0:
                        return 1
        return 0
    from rlrt_megatron import platform
    from rlrt_megatron.megatron.model import resolve_spec

    platform.init_distributed(1, 1, seed=0)
    budgets = [int(t) for t in args.tokens.split(",")]
    spec = resolve_spec(specs[0])
    if args.device == "cpu":
        from rlrt_megatron.convert.tiny import TINY_SHAPE

        tiny = {**TINY_SHAPE, "vocab_size": 512, "tie_word_embeddings": True,
                "model_type": "qwen3"}  # fmt: skip
        run("tiny", ModelShape.from_hf(tiny, "tiny"), [256, 512], 64, "cpu", spec)
        return 0
    name = models[0].replace(".", "_").replace("-", "_")
    if specs[0] != "auto":
        name += f"_{spec}"
    if row_lens[0] != 1024:
        name += f"_row{row_lens[0]}"
    print(f"# spec={spec} (asked {specs[0]})", flush=True)
    run(name, BUILTIN_SHAPES[models[0]], budgets, row_lens[0], "cuda", spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
