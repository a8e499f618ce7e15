#!/usr/bin/env python
"""Logit parity of a Megatron checkpoint (at TP x PP, CPU gloo processes) vs transformers.

`python tools/check_parity.py --hf DIR --ckpt DIR --tp 2 --pp 2` prints
`max_abs_logit_diff=<float>` on its last line (fp32, over the true vocabulary); `--ep N` splits a
MoE model's experts over N more processes.
"""

from __future__ import annotations

import argparse
import sys

from rlrt_megatron.convert.parity import run_parity


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
    p.add_argument(
        "--threshold", type=float, default=None, help="exit 1 when the difference exceeds this"
    )
    args = p.parse_args(argv)
    diff = run_parity(
        args.hf, args.ckpt, args.tp, args.pp, ep=args.ep, batch=args.batch, seq=args.seq,
        seed=args.seed,
    )  # fmt: skip
    print(f"tp={args.tp} pp={args.pp} ep={args.ep} batch={args.batch} seq={args.seq}")
    print(f"max_abs_logit_diff={diff:.6g}")
    return 1 if args.threshold is not None and diff > args.threshold else 0


if __name__ == "__main__":
    sys.exit(main())
