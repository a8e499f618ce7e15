"""`rlrt data prepare NAME --src DOWNLOAD --out FILE`: training sets from local downloads."""

from __future__ import annotations

import argparse
import sys


def _prepare(args: argparse.Namespace) -> int:
    from rlrt_megatron.data.datasets import DatasetError
    from rlrt_megatron.data.prepare import prepare_dapo_math

    try:
        report = prepare_dapo_math(args.src, args.out)
    except DatasetError as e:
        print(f"rlrt data prepare: {e}", file=sys.stderr)
        return 2
    print(report.line())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from rlrt_megatron.data.prepare import DATASETS

    p = subparsers.add_parser("data", help="prepare training data sets from local downloads")
    sub = p.add_subparsers(dest="data_command", required=True)
    q = sub.add_parser(
        "prepare",
        help="check, deduplicate and write a training set (no network: download it first)",
        description="e.g. huggingface-cli download BytedTsinghua-SIA/DAPO-Math-17k "
        "--repo-type dataset --local-dir /shared/dl/dapo; rlrt data prepare dapo-math-17k "
        "--src /shared/dl/dapo --out /shared/data/dapo-math-17k.parquet",
    )
    q.add_argument("name", choices=DATASETS)
    q.add_argument("--src", required=True, help="the local download: a parquet/jsonl or its dir")
    q.add_argument("--out", required=True, help="the prepared .parquet (the recipes' data.path)")
    q.set_defaults(func=_prepare)
