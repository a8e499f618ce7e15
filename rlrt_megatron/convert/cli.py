"""`rlrt convert hf-to-megatron | megatron-to-hf | tiny-model` (also `tools/convert.py`)."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable


def _user_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Print input problems (bad directory, architecture, shapes, dtype) as one line, exit 2."""

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            print(f"rlrt convert: error: {msg}", file=sys.stderr)
            return 2

    return wrapper


def _log() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@_user_errors
def _hf_to_megatron(args: argparse.Namespace) -> int:
    _log()
    from rlrt_megatron.convert.hf_to_megatron import hf_to_megatron

    out = hf_to_megatron(
        args.hf, args.out, dtype=args.dtype, spec=args.spec, overwrite=args.overwrite
    )
    print(f"wrote Megatron dist checkpoint {out}")
    return 0


@_user_errors
def _megatron_to_hf(args: argparse.Namespace) -> int:
    _log()
    from rlrt_megatron.convert.megatron_to_hf import megatron_to_hf

    out = megatron_to_hf(
        args.ckpt,
        args.out,
        dtype=args.dtype,
        hf_config_dir=args.hf_config,
        key_prefix=args.key_prefix,
        max_shard_bytes=args.max_shard_bytes or int(args.max_shard_gb * 1024**3),
        overwrite=args.overwrite,
    )
    print(f"wrote Hugging Face model {out}")
    return 0


@_user_errors
def _tiny_model(args: argparse.Namespace) -> int:
    from rlrt_megatron.convert.io import parse_dtype
    from rlrt_megatron.convert.tiny import make_tiny_model

    out = make_tiny_model(
        args.out,
        arch=args.arch,
        tied=args.tied,
        vocab_size=args.vocab,
        seed=args.seed,
        dtype=parse_dtype(args.dtype),
    )
    print(f"wrote tiny {args.arch} model {out}")
    return 0


def add_tiny_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (HF format)")
    p.add_argument("--arch", choices=("qwen3", "qwen3_moe", "llama"), default="qwen3")
    tie = p.add_mutually_exclusive_group()
    tie.add_argument(
        "--tied",
        dest="tied",
        action="store_true",
        default=True,
        help="tie input embeddings and lm_head (default)",
    )
    tie.add_argument("--untied", dest="tied", action="store_false", help="separate lm_head")
    p.add_argument("--vocab", type=int, default=512, help="model vocab size (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="fp32", help="bf16 | fp16 | fp32 (default fp32)")
    p.set_defaults(func=_tiny_model)


def add_convert_subcommands(sub: argparse._SubParsersAction) -> None:
    """The conversion sub-commands, shared by `rlrt convert` and `tools/convert.py`."""
    a = sub.add_parser("hf-to-megatron", help="HF safetensors -> Megatron dist checkpoint")
    a.add_argument("--hf", required=True, help="Hugging Face model directory")
    a.add_argument("--out", required=True, help="output checkpoint directory")
    a.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: keep HF dtype)")
    a.add_argument(
        "--spec",
        choices=("auto", "local", "torch", "te"),
        default="local",
        help="parameter names to write (either loads into either spec)",
    )
    a.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    a.set_defaults(func=_hf_to_megatron)

    b = sub.add_parser("megatron-to-hf", help="Megatron dist checkpoint -> HF safetensors")
    b.add_argument("--ckpt", required=True, help="Megatron dist checkpoint directory")
    b.add_argument("--out", required=True, help="output HF model directory")
    b.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: keep)")
    b.add_argument(
        "--hf-config",
        default=None,
        help="directory with config.json + tokenizer (default: <ckpt>/hf or ../hf)",
    )
    b.add_argument(
        "--max-shard-gb",
        type=float,
        default=2.0,
        help="split model.safetensors above this size (GiB)",
    )
    b.add_argument("--max-shard-bytes", type=int, default=None, help=argparse.SUPPRESS)
    b.add_argument(
        "--key-prefix", default="", help="model key prefix in the checkpoint (e.g. 'teacher.')"
    )
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    b.set_defaults(func=_megatron_to_hf)

    c = sub.add_parser("tiny-model", help="write the tiny random Qwen3/Llama test model")
    add_tiny_model_args(c)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `rlrt convert ...` to the top-level CLI."""
    p = subparsers.add_parser("convert", help="HF <-> Megatron checkpoint conversion")
    sub = p.add_subparsers(dest="convert_command", required=True)
    add_convert_subcommands(sub)
