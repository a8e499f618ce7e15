"""`rlrt eval` (avg@k / pass@k on the math benchmarks) and `rlrt analyze` (RLRT diagnostics)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rlrt_megatron.eval.cli_common import (
    add_model_args,
    add_prompt_args,
    device_dtype,
    instruction_for,
    make_console,
    template_kwargs,
    user_errors,
)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- rlrt eval
def _default_out(ckpt: str) -> Path:
    p = Path(ckpt).resolve()
    tail = f"{p.parent.name}_{p.name}" if p.name.startswith("iter_") else p.name
    return Path("runs") / "eval" / tail


def _make_engine(args: argparse.Namespace, hf_dir: Path):
    """(engine, tokenizer) for `--engine`."""
    from transformers import AutoTokenizer

    if args.engine == "local":
        from rlrt_megatron.rollout.local import LocalEngine

        device, dtype = device_dtype(args)
        engine = LocalEngine(
            hf_dir, device=device, dtype=dtype, seed=args.seed, max_batch_rows=args.batch_rows
        )
        return engine, engine.tokenizer
    from rlrt_megatron.rollout.sglang import SGLangEngine

    engine = SGLangEngine(
        str(hf_dir),
        tp=args.sglang_tp,
        num_servers=args.sglang_servers,
        mem_fraction=args.sglang_mem_fraction,
        colocated=False,
        seed=args.seed,
        dtype=args.sglang_dtype,
        python=args.sglang_python or None,
        extra_args=list(args.sglang_arg or []),
        log_dir=str(Path(args.out or ".") / "sglang_logs") if args.out else None,
    )
    return engine, AutoTokenizer.from_pretrained(str(hf_dir))


@user_errors
def cmd_eval(args: argparse.Namespace) -> int:
    """Sample k answers per problem, score them with math-verify and report avg@k and pass@k
    per benchmark and on average (console table, summary.json, summary.csv). Per-problem results
    are appended to <out>/results.jsonl as they finish; rerunning resumes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from rlrt_megatron.eval.benchmarks import load_benchmarks, parse_benchmark_files
    from rlrt_megatron.eval.model import resolve_model
    from rlrt_megatron.eval.report import render_table, write_report
    from rlrt_megatron.eval.runner import EvalSettings, evaluate, read_results
    from rlrt_megatron.reward.math import MathReward

    console = make_console()
    benches = load_benchmarks(
        args.benchmarks,
        data_dir=args.data_dir,
        files=parse_benchmark_files(args.benchmark_file or []),
        limit=args.max_problems,
    )
    out = Path(args.out) if args.out else _default_out(args.ckpt)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    if args.overwrite and results.exists():
        results.unlink()
    model = resolve_model(args.ckpt, out, args.hf_config)
    settings = EvalSettings(
        k=args.k,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        model=str(Path(args.ckpt).resolve()),
        instruction=instruction_for(args, model.train_config),
        system_prompt=args.system_prompt,
        use_chat_template=not args.no_chat_template,
        chat_template_kwargs=template_kwargs(args),
    )
    settings.validate()
    _, done = read_results(results, settings)
    total = sum(len(b) for b in benches)
    n_done = sum(1 for b in benches for p in b.problems if (b.name, p.uid) in done)
    console.print(
        f"eval {model.label} ({model.source} -> {model.hf_dir}) on "
        f"{', '.join(f'{b.name} ({len(b)})' for b in benches)}, k={args.k}; "
        f"{n_done}/{total} problems already in {results}"
    )
    engine, tokenizer = _make_engine(args, model.hf_dir)
    try:
        with (
            MathReward(timeout_s=args.reward_timeout, num_workers=args.reward_workers) as reward,
            Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
                disable=not console.is_terminal,
            ) as bar,
        ):
            task = bar.add_task("problems", total=total, completed=n_done)
            report = evaluate(
                engine,
                benches,
                settings,
                tokenizer=tokenizer,
                reward=reward,
                results_path=results,
                concurrency=args.concurrency,
                save_responses=args.save_responses,
                on_problem=lambda rec: bar.advance(task),
                stop_after=args.stop_after,
            )
    finally:
        engine.shutdown()
    paths = write_report(report, out)
    console.print(render_table(report))
    n_have = sum(len(r) for r in report.records.values())
    if n_have < total:
        console.print(
            f"[yellow]partial: {n_have}/{total} problems done (--stop-after); rerun the same "
            "command to resume[/yellow]"
        )
    console.print(
        f"sampled {report.n_sampled}, resumed {report.n_resumed}; wrote {results}, "
        f"{paths['json']}, {paths['csv']}"
    )
    return 0


def add_eval_args(p: argparse.ArgumentParser) -> None:
    from rlrt_megatron.eval.benchmarks import BENCHMARKS, SYNTHETIC

    p.add_argument(
        "--ckpt",
        required=True,
        help="HF model dir, trainer checkpoint (root with `latest`, or iter_N) or Megatron "
        "dist checkpoint",
    )
    p.add_argument(
        "--benchmarks",
        default=",".join(BENCHMARKS),
        help=f"comma-separated names: {', '.join([*BENCHMARKS, SYNTHETIC])} (or any name "
        "given a --benchmark-file); default: the six of the paper",
    )
    p.add_argument("--k", type=int, default=16, help="samples per problem (avg@k, pass@k)")
    p.add_argument("--data-dir", default=None, help="directory with <name>.jsonl|.parquet|...")
    p.add_argument(
        "--benchmark-file",
        action="append",
        metavar="NAME=PATH",
        help="file (or save_to_disk dir, PATH#split) for one benchmark; repeatable",
    )
    p.add_argument(
        "--out", default=None, help="output dir (default runs/eval/<ckpt name>); resumes"
    )
    p.add_argument("--overwrite", action="store_true", help="discard results already in --out")
    p.add_argument("--engine", choices=("local", "sglang"), default="local")
    p.add_argument("--max-new-tokens", type=int, default=4096)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (per problem: hashed)")
    p.add_argument("--max-problems", type=int, default=None, help="first N of each benchmark")
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="sample at most N new problems, then report and exit (rerun resumes)",
    )
    p.add_argument(
        "--concurrency", type=int, default=1, help="problems in flight (SGLang: e.g. 64)"
    )
    p.add_argument("--batch-rows", type=int, default=64, help="local engine rows per forward")
    p.add_argument("--save-responses", action="store_true", help="keep response texts")
    p.add_argument("--reward-workers", type=int, default=2)
    p.add_argument("--reward-timeout", type=float, default=10.0, help="seconds per sample")
    p.add_argument("--sglang-tp", type=int, default=1)
    p.add_argument("--sglang-servers", type=int, default=1)
    p.add_argument("--sglang-mem-fraction", type=float, default=0.85)
    p.add_argument("--sglang-dtype", default="bfloat16", help="servers' --dtype")
    p.add_argument(
        "--sglang-python", default="", help="interpreter with SGLang (default: this one)"
    )
    p.add_argument(
        "--sglang-arg",
        action="append",
        metavar="ARG",
        help="extra sglang.launch_server argument (repeatable, e.g. --sglang-arg=--device "
        "--sglang-arg=cpu)",
    )
    add_model_args(p)
    add_prompt_args(p)
    p.set_defaults(func=cmd_eval)


# --------------------------------------------------------------------------- registration
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `rlrt eval` and `rlrt analyze` to the top-level CLI."""
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    e = subparsers.add_parser(
        "eval",
        help="avg@k / pass@k on math benchmarks (resumable)",
        description=cmd_eval.__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_eval_args(e)
    try:
        from rlrt_megatron.eval.analyze_cli import add_analyze_args, cmd_analyze
    except ImportError:  # pragma: no cover - analyze not importable: eval still works
        return
    a = subparsers.add_parser(
        "analyze",
        help="RLRT diagnostics: per-token Delta, explore/exploit tokens, reflection "
        "injection, JSD vs the base model (PNG plots)",
        description=cmd_analyze.__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_analyze_args(a)
    a.set_defaults(func=cmd_analyze)
