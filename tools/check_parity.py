#!/usr/bin/env python
"""Logit parity of a Megatron checkpoint (at TP x PP, CPU gloo processes) vs transformers.

`python tools/check_parity.py --hf DIR --ckpt DIR --tp 2 --pp 2` prints a verdict line, then
`max_abs_logit_diff=<float>` on its last line (fp32, over the true vocabulary), and exits 1 when
the difference exceeds `--threshold` (default 1e-2).

What is acceptable: both sides run in fp32, so a correct conversion differs only by the order of
floating-point sums (TP splits the matmuls and reductions): below 1e-4 on the tiny test models
(tests/distributed/test_parity.py), and it grows slowly with depth and width, so 1e-2 leaves
margin at 8B. A conversion error (a swapped q/k/v or gate/up split, wrong GQA grouping, a missing
norm or bias) moves logits by O(1): far above any threshold.
`--ep N` splits a MoE model's experts over N more processes.
"""

from __future__ import annotations

import argparse
import sys

from rlrt_megatron.convert.parity import run_parity

# fp32 vs fp32: summation order only (module docstring); conversion errors are O(1)
DEFAULT_THRESHOLD = 1e-2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/check_parity.py", description=__doc__.splitlines()[0])
    p.add_argument("--hf", required=True, help="Hugging Face model directory")
    p.add_argument("--ckpt", required=True, help="Megatron dist checkpoint of the same model")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models)")
    p.add_argument("--batch", type=int, default=2, help="sequences in the random batch")
    p.add_argument("--seq", type=int, default=24, help="tokens per sequence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="exit 1 when the difference exceeds this")  # fmt: skip
    args = p.parse_args(argv)
    diff = run_parity(
        args.hf, args.ckpt, args.tp, args.pp, ep=args.ep, batch=args.batch, seq=args.seq,
        seed=args.seed,
    )  # fmt: skip
    ok = diff <= args.threshold  # nan fails
    print(f"tp={args.tp} pp={args.pp} ep={args.ep} batch={args.batch} seq={args.seq}")
    print(
        f"{'PASS' if ok else 'FAIL'}: max abs logit difference {diff:.3g} "
        f"{'<=' if ok else '>'} threshold {args.threshold:g} (fp32 both sides: a correct "
        "conversion differs only by summation order; errors are O(1))"
    )
    print(f"max_abs_logit_diff={diff:.6g}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
