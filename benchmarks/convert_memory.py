#!/usr/bin/env python
"""Peak RSS of the HF <-> Megatron conversion relative to the checkpoint size.

Writes a random Qwen3-shaped bf16 checkpoint (default: hidden 2048, 16 layers, GQA 16/8 heads,
head_dim 128, ffn 6144, vocab 151936, tied: ~1.1B parameters, ~2.2 GB) to a temporary
directory, then runs each conversion direction as a child process (`rlrt convert ...`) and reads
that child's peak RSS from `os.wait4` (the kernel's max over the child and its own children, such
as dist_checkpointing's writer processes). Prints one line per direction:

    hf-to-megatron  peak_rss=... GiB  checkpoint=... GiB  ratio=...   (goal <= 1.3)

plus the RSS of a child that only imports the conversion code, for reference.
The converted checkpoint is then exported back and compared tensor by tensor (bit-exact).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1024**3


def make_random_qwen3(out: Path, *, hidden: int, layers: int, vocab: int, ffn: int,
                      heads: int, kv_heads: int, head_dim: int, seed: int = 0) -> int:  # fmt: skip
    """A random bf16 Qwen3 HF checkpoint written layer by layer (low memory); returns bytes."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    def norm(n: int) -> torch.Tensor:
        return (1 + 0.1 * torch.randn(n, generator=gen)).to(torch.bfloat16)

    weight_map: dict[str, str] = {}
    total = 0

    def write(tensors: dict[str, torch.Tensor], idx: int) -> None:
        nonlocal total
        fname = f"model-{idx + 1:05d}-of-{layers + 2:05d}.safetensors"
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    write({"model.embed_tokens.weight": rnd(vocab, hidden)}, 0)
    for i in range(layers):
        p = f"model.layers.{i}."
        write(
            {
                p + "input_layernorm.weight": norm(hidden),
                p + "self_attn.q_proj.weight": rnd(heads * head_dim, hidden),
                p + "self_attn.k_proj.weight": rnd(kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.weight": rnd(kv_heads * head_dim, hidden),
                p + "self_attn.q_norm.weight": norm(head_dim),
                p + "self_attn.k_norm.weight": norm(head_dim),
                p + "self_attn.o_proj.weight": rnd(hidden, heads * head_dim),
                p + "post_attention_layernorm.weight": norm(hidden),
                p + "mlp.gate_proj.weight": rnd(ffn, hidden),
                p + "mlp.up_proj.weight": rnd(ffn, hidden),
                p + "mlp.down_proj.weight": rnd(hidden, ffn),
            },
            i + 1,
        )
    write({"model.norm.weight": norm(hidden)}, layers + 1)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "tie_word_embeddings": True,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return total


def dir_bytes(d: Path, suffixes: tuple[str, ...]) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file() and p.suffix in suffixes)


def run_measured(args: list[str]) -> tuple[float, float]:
    """Run a child; return (peak RSS in bytes of it and its descendants, seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{stderr.decode()[-4000:]}")
    return usage.ru_maxrss * 1024.0, elapsed  # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--ffn", type=int, default=6144)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")
    p.add_argument("--skip-verify", action="store_true", help="skip the bit-exact comparison")
    p.add_argument("--generate", metavar="DIR", help=argparse.SUPPRESS)  # child: write the model
    p.add_argument("--verify", nargs=2, metavar="DIR", help=argparse.SUPPRESS)  # child: compare
    args = p.parse_args(argv)

    if args.generate:
        size = make_random_qwen3(
            Path(args.generate), hidden=args.hidden, layers=args.layers, vocab=args.vocab,
            ffn=args.ffn, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
        )  # fmt: skip
        print(size)
        return 0
    if args.verify:
        return verify(Path(args.verify[0]), Path(args.verify[1]))

    # The parent imports neither torch nor megatron and does no tensor work: Linux carries
    # ru_maxrss across exec, so a big parent would inflate every child's measured peak.
    py, me = sys.executable, str(Path(__file__).resolve())
    dims = [f"--hidden={args.hidden}", f"--layers={args.layers}", f"--vocab={args.vocab}",
            f"--ffn={args.ffn}", f"--heads={args.heads}", f"--kv-heads={args.kv_heads}",
            f"--head-dim={args.head_dim}"]  # fmt: skip
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        hf = root / "hf"
        t0 = time.perf_counter()
        run_measured([py, me, "--generate", str(hf), *dims])
        size = dir_bytes(hf, (".safetensors",))
        print(f"random Qwen3 checkpoint: {size / 2 / 1e9:.2f}B parameters, {size / GIB:.2f} GiB "
              f"bf16 ({time.perf_counter() - t0:.0f}s to write)")  # fmt: skip

        imports = "import rlrt_megatron.convert.hf_to_megatron, megatron.core.dist_checkpointing"
        base, _ = run_measured([py, "-c", imports])
        print(f"import-only child: peak_rss={base / GIB:.2f} GiB")

        cli = [py, "-m", "rlrt_megatron.cli", "convert"]
        rss, sec = run_measured(
            cli + ["hf-to-megatron", "--hf", str(hf), "--out", str(root / "mc")]
        )
        ckpt = dir_bytes(root / "mc", (".distcp",))
        print(f"hf-to-megatron  peak_rss={rss / GIB:.2f} GiB  checkpoint={size / GIB:.2f} GiB  "
              f"ratio={rss / size:.2f}  ({sec:.0f}s; dist ckpt {ckpt / GIB:.2f} GiB)")  # fmt: skip
        rss2, sec2 = run_measured(
            cli + ["megatron-to-hf", "--ckpt", str(root / "mc"), "--out", str(root / "back")]
        )
        print(f"megatron-to-hf  peak_rss={rss2 / GIB:.2f} GiB  checkpoint={ckpt / GIB:.2f} GiB  "
              f"ratio={rss2 / ckpt:.2f}  ({sec2:.0f}s)")  # fmt: skip
        if not args.skip_verify:
            run_measured([py, me, "--verify", str(hf), str(root / "back")])
            print("round trip bit-exact: every tensor equal")
        worst = max(rss / size, rss2 / ckpt)
        print(f"max_ratio={worst:.2f} goal<=1.3 {'OK' if worst <= 1.3 else 'ABOVE GOAL'}")
    return 0


def verify(a: Path, b: Path) -> int:
    """Exit 0 iff both HF directories hold the same tensor names with identical values."""
    import torch
    from safetensors import safe_open

    def index(d: Path) -> dict[str, str]:
        return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]

    a_map, b_map = index(a), index(b)
    if sorted(a_map) != sorted(b_map):
        raise SystemExit(f"tensor names differ: {sorted(set(a_map) ^ set(b_map))[:10]}")
    for name in a_map:
        with (
            safe_open(str(a / a_map[name]), "pt") as fa,
            safe_open(str(b / b_map[name]), "pt") as fb,
        ):
            if not torch.equal(fa.get_tensor(name), fb.get_tensor(name)):
                raise SystemExit(f"{name} differs after the round trip")
    return 0


if __name__ == "__main__":
    sys.exit(main())
