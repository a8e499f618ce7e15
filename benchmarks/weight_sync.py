"""Weight-sync throughput (GB/s) against the copy-bandwidth bound.

    .venv/bin/python benchmarks/weight_sync.py [--layers 4] [--bucket-mb 512] [--device cpu]
    .venv/bin/python benchmarks/weight_sync.py --device cuda --layers 28          # GPU node
    .venv/bin/python benchmarks/weight_sync.py --device cuda --url http://127.0.0.1:30000 \
        --api-key KEY --mode tensor                                                 # + live SGLang

Weights: Qwen3-0.6B-shaped bf16 tensors (hidden 1024, ffn 3072, 16 q / 8 kv heads of 128,
vocab 151936; `--layers` of its 28) in HF names and order, as iter_hf_weights yields them.

Rows (each: best of `--repeats` after one warm-up; GB/s = payload bytes / seconds):
  copy bound     one `dst.copy_(src)` of a flat buffer holding all the bytes: the memory-copy
                 bandwidth of the device, the ceiling for any path that copies the weights once
  bucketing      bucket_named_tensors only (grouping, no data movement; should be ~free)
  flatten        bucketing + flatten_bucket (one copy of every byte into per-bucket buffers)
  serialize      bucketing + the /update_weights_from_tensor payload of every bucket. On CPU:
                 ForkingPickler moves each storage into shared memory (a copy). On CUDA with
                 SGLang installed: FlattenedTensorBucket (one copy) + IPC handles (no copy).
  sglang e2e     (--url) SGLangEngine.connect(...).update_weights on a live server: the full
                 sync including the server's load_weights, version check
Ratios are copy-bound time / row time (1.0 = as fast as one memcpy of the weights).
On CPU the copy bound reuses a touched buffer while flatten/serialize allocate fresh memory each
round (as a sync does), so first-touch page faults dominate their time; CUDA's caching
allocator has no such cost, so GPU ratios are the ones that tell the sync's efficiency.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rlrt_megatron.rollout.sglang import serialize_for_sglang
from rlrt_megatron.rollout.weight_sync import bucket_named_tensors, flatten_bucket

QWEN3_06B = dict(hidden=1024, ffn=3072, heads=16, kv_heads=8, head_dim=128, vocab=151936)


def qwen3_like_weights(layers: int, device: str, dtype=torch.bfloat16, seed: int = 0):
    s = QWEN3_06B
    h, d = s["hidden"], s["head_dim"]
    shapes = [("model.embed_tokens.weight", (s["vocab"], h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (s["heads"] * d, h)),
            (p + "self_attn.k_proj.weight", (s["kv_heads"] * d, h)),
            (p + "self_attn.v_proj.weight", (s["kv_heads"] * d, h)),
            (p + "self_attn.q_norm.weight", (d,)),
            (p + "self_attn.k_norm.weight", (d,)),
            (p + "self_attn.o_proj.weight", (h, s["heads"] * d)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (s["ffn"], h)),
            (p + "mlp.up_proj.weight", (s["ffn"], h)),
            (p + "mlp.down_proj.weight", (h, s["ffn"])),
        ]
    shapes.append(("model.norm.weight", (h,)))
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [(n, torch.randn(sh, generator=g, dtype=torch.float32).to(dtype).to(device))
            for n, sh in shapes]  # fmt: skip


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_time(fn, repeats: int, device: str, setup=None) -> float:
    """Best of `repeats` timed calls after one warm-up; `setup()` (untimed) makes the input."""
    times = []
    for i in range(repeats + 1):
        arg = setup() if setup else None
        _sync(device)
        t0 = time.perf_counter()
        fn(arg) if setup else fn()
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of Qwen3-0.6B's 28")
    ap.add_argument("--bucket-mb", type=float, default=512.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--url", default=None, help="a live SGLang server for the end-to-end row")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--mode", default="tensor", choices=["tensor", "distributed", "disk"])
    ap.add_argument("--sync-dir", default=None, help="shared directory for --mode disk")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    weights = qwen3_like_weights(args.layers, args.device)
    nbytes = sum(t.numel() * t.element_size() for _, t in weights)
    bucket_bytes = int(args.bucket_mb * 2**20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=args.device)
    dst = torch.empty_like(src)
    src.fill_(1)
    dst.fill_(0)  # touch the pages so the copy does not time first-touch faults

    def copy_bound():
        dst.copy_(src)

    def bucketing():
        for _ in bucket_named_tensors(iter(weights), bucket_bytes):
            pass

    def flatten():
        for b in bucket_named_tensors(iter(weights), bucket_bytes, split_by_dtype=True):
            flatten_bucket(b)

    def fresh():
        # new storages each round, as each step's iter_hf_weights makes: on CPU the first
        # pickling of a storage moves it into shared memory, later ones are free
        return [(n, t.clone()) for n, t in weights]

    def serialize(ws):
        for b in bucket_named_tensors(iter(ws), bucket_bytes, split_by_dtype=True):
            serialize_for_sglang(b)

    rows = [("copy bound", copy_bound, None), ("bucketing", bucketing, None)]
    rows.append(("flatten", flatten, None))
    if args.device.startswith("cuda"):
        try:
            import sglang  # noqa: F401

            rows.append(("serialize (IPC)", serialize, fresh))
        except ImportError:
            print("# sglang not installed: skipping the CUDA IPC serialize row")
    else:
        rows.append(("serialize (shm)", serialize, fresh))

    results = {}
    for name, fn, setup in rows:
        results[name] = best_time(fn, args.repeats, args.device, setup)
    if args.url:
        from rlrt_megatron.rollout.sglang import SGLangEngine

        eng = SGLangEngine.connect(
            [args.url], api_key=args.api_key, sync_mode=args.mode, sync_dir=args.sync_dir,
            bucket_bytes=bucket_bytes,
        )  # fmt: skip
        version = [int(eng.servers[0].client.get_weight_version() or 0) + 100]

        def e2e():
            version[0] += 1
            eng.update_weights(iter(weights), version[0])

        results["sglang e2e"] = best_time(e2e, args.repeats, args.device)

    base = results["copy bound"]
    print(
        f"# {len(weights)} tensors, {nbytes / 1e9:.3f} GB bf16 ({args.layers} layers), "
        f"bucket {args.bucket_mb:g} MiB, device {args.device}, torch threads "
        f"{torch.get_num_threads()}"
    )
    print(f"{'path':<18}{'seconds':>10}{'GB/s':>10}{'vs copy':>10}")
    for name, t in results.items():
        print(f"{name:<18}{t:>10.4f}{nbytes / t / 1e9:>10.2f}{base / t:>10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bytes": nbytes, "device": args.device, "seconds": results}, f, indent=1)


if __name__ == "__main__":
    main()
