"""`rlrt analyze`: the command line over eval.analyze (sampling, Delta, reflection, JSD) and
eval.plots; writes PNG plots and analysis.json into --out."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlrt_megatron.data.teacher import DEFAULT_TEACHER_TEMPLATE
from rlrt_megatron.data.templates import PromptTemplate
from rlrt_megatron.eval import cli_common, plots
from rlrt_megatron.eval.analyze import (
    ANALYSES,
    REFLECTION_PHRASE,
    Rollout,
    compute_deltas,
    delta_analysis,
    jsd_analysis,
    reflection_injection,
    sample_rollouts,
    teacher_probe,
)
from rlrt_megatron.rollout.base import SamplingParams


def add_analyze_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="the (trained) policy: HF dir or checkpoint")
    p.add_argument(
        "--base", default=None, help="base model for the JSD analysis (HF dir or checkpoint)"
    )
    p.add_argument("--benchmarks", default="synthetic", help="comma-separated benchmark names")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--benchmark-file", action="append", metavar="NAME=PATH")
    p.add_argument("--max-problems", type=int, default=8, help="first N problems of each")
    p.add_argument("--k", type=int, default=4, help="rollouts per problem (the group)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/analyze", help="output directory (PNGs, JSON)")
    p.add_argument(
        "--analyses",
        default="delta,reflection,jsd",
        help="comma-separated subset of delta, reflection, jsd (jsd needs --base)",
    )
    p.add_argument(
        "--teacher",
        default="peer-or-reference",
        choices=("peer", "reference", "peer-or-reference"),
        help="teacher context: a correct peer rollout (RLRT), the reference answer, or peer "
        "with the reference as fallback (default; weak models have few correct peers)",
    )
    p.add_argument("--top-tokens", type=int, default=15)
    p.add_argument("--reflection-phrase", default=REFLECTION_PHRASE)
    p.add_argument("--reflection-samples", type=int, default=1, help="continuations each")
    p.add_argument("--jsd-thresholds", default="0.01,0.05,0.1,0.3", help="nats")
    p.add_argument("--topk", default="1,5,10", help="k of the top-k overlap")
    p.add_argument("--reward-workers", type=int, default=2)
    p.add_argument("--reward-timeout", type=float, default=10.0)
    cli_common.add_model_args(p)
    cli_common.add_prompt_args(p)


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise SystemExit(f"{what}: expected comma-separated numbers, got {text!r}") from e


def _json_ready(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


@dataclass
class AnalysisResult:
    """What `run_analysis` computed (JSON-ready via `to_json`) and the PNGs it wrote."""

    data: dict[str, Any] = field(default_factory=dict)
    pngs: list[Path] = field(default_factory=list)
    rollouts: list[Rollout] = field(default_factory=list)

    def to_json(self) -> dict:
        return _json_ready(self.data)


def cmd_analyze(args: argparse.Namespace) -> int:
    """Sample k rollouts per problem from --ckpt, then: per-token Delta = log pi_T - log pi_S
    (teacher = the same model shown a correct peer solution) with explore/exploit tokens;
    reflection injection at max-Delta / random / min-Delta positions (flipR, flipW); JSD of the
    policy vs --base along its rollouts. Writes PNG plots and analysis.json to --out."""
    return cli_common.user_errors(_analyze)(args)


def _analyze(args: argparse.Namespace) -> int:
    from rlrt_megatron.eval.benchmarks import load_benchmarks, parse_benchmark_files
    from rlrt_megatron.eval.model import resolve_model
    from rlrt_megatron.reward.math import MathReward
    from rlrt_megatron.rollout.local import LocalEngine

    console = cli_common.make_console()
    wanted = [a.strip() for a in args.analyses.split(",") if a.strip()]
    unknown = sorted(set(wanted) - set(ANALYSES))
    if unknown:
        raise SystemExit(f"--analyses: unknown {unknown}; choose from {', '.join(ANALYSES)}")
    if "jsd" in wanted and not args.base:
        if args.analyses != "delta,reflection,jsd":
            raise SystemExit("--analyses jsd needs --base (the model before training)")
        wanted.remove("jsd")
        console.print("no --base: skipping the JSD analysis")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    benches = load_benchmarks(
        args.benchmarks,
        data_dir=args.data_dir,
        files=parse_benchmark_files(args.benchmark_file or []),
        limit=args.max_problems,
    )
    model = resolve_model(args.ckpt, out, args.hf_config)
    device, dtype = cli_common.device_dtype(args)
    template = PromptTemplate(
        instruction=cli_common.instruction_for(args, model.train_config),
        system_prompt=args.system_prompt,
        use_chat_template=not args.no_chat_template,
        chat_template_kwargs=cli_common.template_kwargs(args),
    )
    engine = LocalEngine(model.hf_dir, device=device, dtype=dtype, seed=args.seed)
    tok = engine.tokenizer
    result: dict[str, Any] = {
        "model": str(args.ckpt),
        "base": args.base,
        "benchmarks": [b.name for b in benches],
        "k": args.k,
        "teacher": args.teacher,
    }
    pngs: list[Path] = []
    with MathReward(timeout_s=args.reward_timeout, num_workers=args.reward_workers) as reward:
        rollouts = sample_rollouts(
            engine,
            tok,
            benches,
            args.k,
            reward,
            template=template,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
        )
        result["rollouts"] = len(rollouts)
        result["accuracy"] = sum(r.correct for r in rollouts) / max(1, len(rollouts))
        console.print(
            f"sampled {len(rollouts)} rollouts ({result['accuracy']:.1%} correct) from "
            f"{model.hf_dir}"
        )
        if "delta" in wanted or "reflection" in wanted:
            compute_deltas(
                engine.model,
                tok,
                rollouts,
                args.k,
                template=template,
                teacher=args.teacher,
                seed=args.seed,
            )
        if "delta" in wanted:
            result["delta"] = delta_analysis(rollouts, tok, args.top_tokens)
            result["delta"]["stats"].update(
                teacher_probe(
                    engine,
                    tok,
                    rollouts,
                    args.k,
                    reward,
                    sampling=SamplingParams(
                        n=args.k,
                        temperature=args.temperature,
                        max_new_tokens=args.max_new_tokens,
                        seed=args.seed,
                    ),
                    teacher_template=DEFAULT_TEACHER_TEMPLATE,
                    template=template,
                )
            )
            pngs += [
                plots.plot_delta_traces(rollouts, tok, out / "delta_trace.png"),
                plots.plot_delta_hist(rollouts, out / "delta_hist.png"),
                plots.plot_explore_exploit(result["delta"], out / "explore_exploit_tokens.png"),
            ]
        if "reflection" in wanted:
            result["reflection"] = reflection_injection(
                engine,
                tok,
                rollouts,
                reward,
                phrase=args.reflection_phrase,
                samples=args.reflection_samples,
                temperature=args.temperature,
                max_new_tokens=args.max_new_tokens,
                seed=args.seed,
            )
            pngs.append(plots.plot_reflection(result["reflection"], out / "reflection_flips.png"))
    if "jsd" in wanted:
        from transformers import AutoModelForCausalLM

        base_dir = resolve_model(args.base, out / "base", args.hf_config).hf_dir
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype).to(device).eval()
        thresholds = _floats(args.jsd_thresholds, "--jsd-thresholds")
        ks = [int(k) for k in _floats(args.topk, "--topk")]
        result["jsd"] = jsd_analysis(
            engine.model, base, tok, rollouts, thresholds=thresholds, ks=ks, top=args.top_tokens
        )
        if result["jsd"].get("n_tokens"):
            pngs.append(plots.plot_jsd(result["jsd"], out / "jsd.png"))
    engine.shutdown()
    res = AnalysisResult(result, pngs, rollouts)
    (out / "analysis.json").write_text(json.dumps(res.to_json(), indent=1) + "\n")
    plots.print_summary(console, res.to_json())
    console.print(f"wrote {out / 'analysis.json'} and {', '.join(str(p) for p in pngs)}")
    return 0
