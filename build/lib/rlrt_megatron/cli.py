"""`rlrt` command line: `demo | train | compare | convert | eval | analyze | slurm | plan | data`.

Each sub-command lives with its subpackage (`<module>.register(subparsers)`); importing this file
imports none of them, so `rlrt --help` stays fast and a missing optional package only affects the
sub-command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> module that defines `register(subparsers)` adding it (and setting `func`).
SUBCOMMANDS: dict[str, str] = {
    "demo": "rlrt_megatron.trainer.cli",
    "train": "rlrt_megatron.trainer.cli",
    "compare": "rlrt_megatron.compare.cli",
    "convert": "rlrt_megatron.convert.cli",
    "eval": "rlrt_megatron.eval.cli",
    "analyze": "rlrt_megatron.eval.cli",
    "slurm": "rlrt_megatron.launch.cli",
    "plan": "rlrt_megatron.launch.cli",
    "data": "rlrt_megatron.data.cli",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlrt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    registered: set[str] = set()
    for name, module in SUBCOMMANDS.items():
        if only is not None and name != only:
            continue
        if module in registered:
            continue
        try:
            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("rlrt_megatron"):
                continue  # sub-command not built yet
            raise
        registered.add(module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    args = build_parser(only).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
