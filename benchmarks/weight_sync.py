"""Weight-sync throughput against the device's copy bandwidth: every row moves the bytes it names.

    python benchmarks/weight_sync.py --device cuda                 # GPU node: Qwen3-0.6B, 1.19 GB
    python benchmarks/weight_sync.py --device cpu --layers 1 --vocab 4096 --repeats 1   # quick
    python benchmarks/weight_sync.py --device cuda --url http://127.0.0.1:30000 --api-key KEY

Weights: Qwen3-0.6B-shaped bf16 tensors (hidden 1024, ffn 3072, 16 q / 8 kv heads of 128,
vocab 151936; `--layers` of its 28) in HF names and order, as convert.load.iter_hf_weights
yields them. What the colocated sync (SGLangEngine, sync_mode=tensor) does per step, after
iter_hf_weights: bucket_named_tensors(split_by_dtype=True) -> one flat buffer per bucket
(SGLang's FlattenedTensorBucket: torch.cat of the flattened tensors) -> CUDA IPC handles (no
copy) -> the server copies the bytes into its own parameters. So the ideal is two copies of
the payload (flatten + load); the rows time those copies.

Rows (best of `--repeats` after one warm-up; the device is synchronized before each timer
stops; every row's output bytes are counted and compared with the payload, and the first
round's output is compared with the input bit for bit):
  copy bound          one `dst.copy_(src)` of a flat buffer of all the bytes: the device's copy
                      bandwidth, the floor for any path that copies the weights once
  flatten_bucket      bucketing + rollout.weight_sync.flatten_bucket (ours: one torch.cat(out=)
                      per bucket into a 16-byte-aligned byte buffer)
  flatten (sglang)    bucketing + what SGLang's FlattenedTensorBucket does (torch.cat of the
                      flattened tensors; SGLang's own class when it is installed)
  flatten + load      flatten_bucket + the receiver's copy of every tensor out of the flat
                      buffer into preallocated parameters (one fused torch._foreach_copy_):
                      two copies, so 0.5 of the copy bound is ideal
  serialize           (CPU, or CUDA with SGLang installed) bucketing + serialize_for_sglang:
                      on CPU ForkingPickler moves each storage into shared memory (a copy);
                      on CUDA FlattenedTensorBucket (a copy) + IPC handles (no copy)
  sglang e2e          (--url) SGLangEngine.connect(...).update_weights on a live server
Overhead (no bytes moved, so no bandwidth): `bucketing` = bucket_named_tensors alone.

Output: a table (seconds, payload GB/s, copy-bound time / row time) and `RESULT key=value ...`
lines (tools/gpu_check.sh collects them). On CPU, flatten rows allocate fresh memory each round
(as a sync does) and pay first-touch page faults that the copy bound's reused buffer does not;
CUDA's caching allocator has no such cost, so GPU ratios are the ones that judge the sync.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rlrt_megatron.rollout.sglang import serialize_for_sglang
from rlrt_megatron.rollout.weight_sync import (
    bucket_named_tensors,
    flatten_bucket,
    tensor_nbytes,
    unflatten_bucket,
)

QWEN3_06B = dict(hidden=1024, ffn=3072, heads=16, kv_heads=8, head_dim=128, vocab=151936)


def qwen3_like_weights(layers: int, device: str, dtype=torch.bfloat16, seed: int = 0,
                       vocab: int = QWEN3_06B["vocab"]):  # fmt: skip
    s = QWEN3_06B
    h, d = s["hidden"], s["head_dim"]
    shapes = [("model.embed_tokens.weight", (vocab, h))]
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
    g = torch.Generator(device=device).manual_seed(seed)
    # generated on the device: no host round trip for 1.2 GB
    return [(n, torch.randn(sh, generator=g, device=device, dtype=torch.float32).to(dtype))
            for n, sh in shapes]  # fmt: skip


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_time(fn, repeats: int, device: str, setup=None, check=None) -> float:
    """Best of `repeats` timed calls after one warm-up. `setup()` (untimed) makes the input;
    `check(output)` (untimed, after the device finished) validates what the call produced."""
    times = []
    for i in range(repeats + 1):
        arg = setup() if setup else None
        _sync(device)
        t0 = time.perf_counter()
        out = fn(arg) if setup else fn()
        _sync(device)
        dt = time.perf_counter() - t0
        if check is not None:
            check(out, first=(i == 0))
        del out
        if i:
            times.append(dt)
    return min(times)


class ByteCheck:
    """Checks that a row's outputs hold exactly the payload (count always, content once)."""

    def __init__(self, weights, payload: int):
        self.ref = dict(weights)
        self.payload = payload

    def flat(self, out, first: bool) -> None:  # out: list of (flat uint8, metas)
        moved = sum(m.nbytes for _, metas in out for m in metas)
        assert moved == self.payload, f"flatten moved {moved} bytes, payload {self.payload}"
        if first:
            for flat, metas in out:
                for name, t in unflatten_bucket(flat, metas):
                    assert torch.equal(t, self.ref[name]), f"flatten corrupted {name}"

    def cat(self, out, first: bool) -> None:  # out: list of (flat same-dtype tensor, names)
        moved = sum(tensor_nbytes(f) for f, _ in out)
        assert moved == self.payload, f"cat moved {moved} bytes, payload {self.payload}"
        if first:
            for f, names in out:
                off = 0
                for n in names:
                    r = self.ref[n]
                    assert torch.equal(f[off : off + r.numel()].view(r.shape), r), n
                    off += r.numel()

    def params(self, out, first: bool) -> None:  # out: dict name -> receiver parameter
        moved = sum(tensor_nbytes(t) for t in out.values())
        assert moved == self.payload, f"load filled {moved} bytes, payload {self.payload}"
        if first:
            for n, t in out.items():
                assert torch.equal(t, self.ref[n]), f"load corrupted {n}"


def sglang_flatten(bucket):
    """SGLang's FlattenedTensorBucket (or the same torch.cat when SGLang is absent)."""
    try:
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket
    except ImportError:
        return torch.cat([t.detach().flatten() for _, t in bucket])
    return FlattenedTensorBucket(named_tensors=bucket).get_flattened_tensor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=28, help="decoder layers of Qwen3-0.6B's 28")
    ap.add_argument("--vocab", type=int, default=QWEN3_06B["vocab"])
    ap.add_argument("--bucket-mb", type=float, default=512.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--url", default=None, help="a live SGLang server for the end-to-end row")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--mode", default="tensor", choices=["tensor", "distributed", "disk"])
    ap.add_argument("--sync-dir", default=None, help="shared directory for --mode disk")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    dev = args.device

    weights = qwen3_like_weights(args.layers, dev, vocab=args.vocab)
    nbytes = sum(tensor_nbytes(t) for _, t in weights)
    bucket_bytes = int(args.bucket_mb * 2**20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    src.fill_(1)
    dst.fill_(0)  # touch the pages so the copy does not time first-touch faults
    check = ByteCheck(weights, nbytes)
    # the receiver's parameters (an engine's model), allocated once like a server's
    engine = {n: torch.empty_like(t) for n, t in weights}

    def copy_bound():
        dst.copy_(src)
        return dst

    def check_copy(out, first):
        assert out.numel() == nbytes
        if first:
            assert bool(torch.equal(out, src)), "copy bound did not copy"

    def buckets():
        return bucket_named_tensors(iter(weights), bucket_bytes, split_by_dtype=True)

    def bucketing():
        return sum(len(b) for b in buckets())

    def flatten():
        return [flatten_bucket(b) for b in buckets()]

    def flatten_sglang():
        return [(sglang_flatten(b), [n for n, _ in b]) for b in buckets()]

    def flatten_load():
        for flat, metas in flatten():
            views = unflatten_bucket(flat, metas)
            torch._foreach_copy_([engine[n] for n, _ in views], [v for _, v in views])
        return engine

    def fresh():
        # new storages each round, as each step's iter_hf_weights makes: on CPU the first
        # pickling of a storage moves it into shared memory, later ones are free
        return [(n, t.clone()) for n, t in weights]

    def serialize(ws):
        return [serialize_for_sglang(b) for b in bucket_named_tensors(
            iter(ws), bucket_bytes, split_by_dtype=True)]  # fmt: skip

    # (name, fn, setup, check, copies of the payload the row makes)
    rows = [
        ("copy bound", copy_bound, None, check_copy, 1),
        ("flatten_bucket", flatten, None, check.flat, 1),
        ("flatten (sglang)", flatten_sglang, None, check.cat, 1),
        ("flatten + load", flatten_load, None, check.params, 2),
    ]
    serialize_row = None
    if dev.startswith("cuda"):
        try:
            import sglang  # noqa: F401

            serialize_row = "serialize (IPC)"
        except ImportError:
            print("# sglang not installed: no CUDA IPC serialize row")
    else:
        serialize_row = "serialize (shm)"
    if serialize_row:
        rows.append((serialize_row, serialize, fresh, None, 1))

    results, copies = {}, {}
    for name, fn, setup, chk, n_copies in rows:
        results[name] = best_time(fn, args.repeats, dev, setup, chk)
        copies[name] = n_copies
    overhead = {"bucketing": best_time(bucketing, args.repeats, dev)}
    if args.url:
        from rlrt_megatron.rollout.sglang import SGLangEngine

        eng = SGLangEngine.connect(
            [args.url], api_key=args.api_key, sync_mode=args.mode, sync_dir=args.sync_dir,
            bucket_bytes=bucket_bytes,
        )  # fmt: skip
        version = [int(eng.servers[0].client.get_weight_version() or 0) + 100]

        def e2e():
            version[0] += 1
            return eng.update_weights(iter(weights), version[0])

        results["sglang e2e"] = best_time(e2e, args.repeats, dev)
        copies["sglang e2e"] = 2

    base = results["copy bound"]
    print(
        f"# {len(weights)} tensors, {nbytes / 1e9:.3f} GB bf16 ({args.layers} layers, vocab "
        f"{args.vocab}), bucket {args.bucket_mb:g} MiB, device {dev}, torch threads "
        f"{torch.get_num_threads()}; GB/s = payload bytes / s; vs copy = copy-bound time / "
        "row time (1.0 = one memcpy of the payload)"
    )
    print(f"{'path':<20}{'copies':>7}{'seconds':>10}{'GB/s':>10}{'vs copy':>10}")
    for name, t in results.items():
        print(f"{name:<20}{copies[name]:>7}{t:>10.4f}{nbytes / t / 1e9:>10.2f}{base / t:>10.2f}")
    for name, t in overhead.items():
        print(f"{name:<20}{0:>7}{t:>10.4f}{'-':>10}{'-':>10}  (grouping only, no bytes)")

    def key(name: str) -> str:
        return name.split(" (")[0].replace(" + ", "_").replace(" ", "_")

    ratios = " ".join(
        f"{key(n)}{'_' + n.split('(')[1].rstrip(')') if '(' in n else ''}_vs_copy={base / t:.2f}"
        for n, t in results.items()
        if n != "copy bound"
    )
    print(f"RESULT device={dev} bytes={nbytes} copy_gbps={nbytes / base / 1e9:.1f} {ratios}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"bytes": nbytes, "device": dev, "seconds": results, "copies": copies,
                 "overhead_seconds": overhead}, f, indent=1,
            )  # fmt: skip


if __name__ == "__main__":
    main()
