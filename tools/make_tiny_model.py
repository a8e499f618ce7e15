#!/usr/bin/env python
"""Write the tiny random Qwen3 / Llama HF checkpoint (2 layers, hidden 64, GQA 4/2) with its
tokenizer: `python tools/make_tiny_model.py --out DIR [--arch qwen3|llama] [--untied] [--vocab N]`.
"""

from __future__ import annotations

import argparse
import sys

from rlrt_megatron.convert.cli import add_tiny_model_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/make_tiny_model.py", description=__doc__)
    add_tiny_model_args(parser)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
