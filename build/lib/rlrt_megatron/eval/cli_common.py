"""Argument and console helpers shared by `rlrt eval` (eval/cli.py) and `rlrt analyze`
(eval/analyze_cli.py). Only the CLI modules import this; the library modules never do."""

from __future__ import annotations

import argparse
import functools
import json
import sys


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--hf-config",
        default=None,
        help="HF config + tokenizer directory for a Megatron checkpoint (default: found next to "
        "it or from the run's config)",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: fp32 on CPU)")


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--instruction",
        default=None,
        help="appended to each problem (default: the training run's data.instruction for a "
        "trainer checkpoint, else the \\boxed{} instruction)",
    )
    p.add_argument("--system-prompt", default=None, help="optional system message")
    p.add_argument(
        "--no-chat-template",
        action="store_true",
        help="plain-text prompt `{problem}\\n{instruction}\\n` (base models without a template)",
    )
    p.add_argument(
        "--chat-template-kwargs",
        default="{}",
        help="JSON for apply_chat_template, e.g. '{\"enable_thinking\": false}'",
    )


def device_dtype(args: argparse.Namespace):
    import torch

    from rlrt_megatron.convert.io import parse_dtype

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = parse_dtype(args.dtype) or (torch.float32 if device == "cpu" else torch.bfloat16)
    return device, dtype


def instruction_for(args: argparse.Namespace, train_config: dict | None) -> str:
    from rlrt_megatron.data.templates import DEFAULT_INSTRUCTION

    if args.instruction is not None:
        return args.instruction
    if train_config and isinstance(train_config.get("data"), dict):
        return str(train_config["data"].get("instruction", DEFAULT_INSTRUCTION))
    return DEFAULT_INSTRUCTION


def template_kwargs(args: argparse.Namespace) -> dict:
    try:
        kw = json.loads(args.chat_template_kwargs)
    except ValueError as e:
        raise SystemExit(f"--chat-template-kwargs: not valid JSON ({e})") from e
    if not isinstance(kw, dict):
        raise SystemExit("--chat-template-kwargs: must be a JSON object")
    return kw


def make_console():
    from rich.console import Console

    c = Console()
    return c if c.is_terminal else Console(width=160)


def user_errors(fn):
    """Run a command; input errors (a bad benchmark file, a results file that cannot be
    resumed, a missing checkpoint) print their message, without a traceback, and exit 2."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from rlrt_megatron.eval.benchmarks import BenchmarkError
        from rlrt_megatron.eval.runner import ResumeError

        try:
            return fn(args)
        except (BenchmarkError, ResumeError, FileNotFoundError) as e:
            print(f"rlrt {args.command}: error: {e}", file=sys.stderr)
            return 2

    return run
