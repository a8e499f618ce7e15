#!/usr/bin/env python
"""Thin wrapper of `rlrt convert`: `python tools/convert.py hf-to-megatron --hf DIR --out DIR`,
`python tools/convert.py megatron-to-hf --ckpt DIR --out DIR`."""

from __future__ import annotations

import argparse
import sys

from rlrt_megatron.convert.cli import add_convert_subcommands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/convert.py", description=__doc__.splitlines()[0])
    add_convert_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
