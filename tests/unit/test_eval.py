"""Eval runner on a fake engine with known answers: avg@k / pass@k, resume, benchmark files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from rlrt_megatron.data.datasets import write_jsonl
from rlrt_megatron.eval import pass_at_k
from rlrt_megatron.eval.benchmarks import (
    BenchmarkError,
    load_benchmarks,
    synthetic_benchmark,
    write_synthetic_benchmark_dir,
)
from rlrt_megatron.eval.report import csv_text, table_text, write_report
from rlrt_megatron.eval.runner import (
    EvalSettings,
    ResumeError,
    evaluate,
    problem_seed,
    run_eval,
)
from rlrt_megatron.reward.math import RewardResult, extract_final_answer
from rlrt_megatron.rollout.base import Completion

K = 4


class CharTokenizer:
    """Characters as token ids (prompts rendered without a chat template)."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(ch) for ch in text]}


def n_correct(seed: int, k: int = K) -> int:
    """How many of a call's k samples the fake engine answers right: a function of the seed,
    so equal records across runs mean equal seeds."""
    return random.Random(seed).randint(0, k)


class FakeEngine:
    """Answers `\\boxed{<answer>}` in the first `n_correct(seed)` samples, a wrong number after.

    Records the problems it sampled; `crash_after` raises on that call (a crash mid-run).
    """

    def __init__(self, answers: dict[str, str], crash_after: int | None = None) -> None:
        self.answers = answers
        self.crash_after = crash_after
        self.sampled: list[str] = []
        self.weight_version = 3

    def generate(self, requests, sampling):
        if self.crash_after is not None and len(self.sampled) >= self.crash_after:
            raise RuntimeError("simulated crash")
        out = []
        for req in requests:
            prompt = "".join(chr(t) for t in req.prompt_token_ids)
            problem = next(p for p in self.answers if prompt.startswith(p))
            self.sampled.append(req.request_id)
            c = n_correct(sampling.seed, sampling.n)
            ans = self.answers[problem]
            texts = [
                f"so \\boxed{{{ans}}}" if j < c else f"so \\boxed{{{int(ans) + 1000}}}"
                for j in range(sampling.n)
            ]
            out.append(
                [
                    Completion(req.request_id, req.prompt_token_ids, [1] * (5 + j), t, [], "stop")
                    for j, t in enumerate(texts)
                ]
            )
        return out


def exact_reward(completions: list[str], references: list[str]) -> RewardResult:
    answers = [extract_final_answer(c) for c in completions]
    scores = [float(a == r) for a, r in zip(answers, references, strict=True)]
    return RewardResult(scores=scores, answers=answers)


def settings(**kw) -> EvalSettings:
    return EvalSettings(
        **{"k": K, "max_new_tokens": 8, "use_chat_template": False, "model": "fake", **kw}
    )


def expected_counts(benches, seed: int = 0) -> dict[str, list[int]]:
    return {
        b.name: [n_correct(problem_seed(seed, b.name, p.uid)) for p in b.problems] for b in benches
    }


def run(benches, tmp: Path | None = None, engine=None, **kw):
    answers = {p.problem: p.answer for b in benches for p in b.problems}
    engine = engine or FakeEngine(answers)
    rep = evaluate(
        engine,
        benches,
        kw.pop("settings", settings()),
        tokenizer=CharTokenizer(),
        reward=exact_reward,
        results_path=None if tmp is None else tmp / "results.jsonl",
        **kw,
    )
    return rep, engine


def test_avg_and_pass_at_k_on_known_answers() -> None:
    benches = [synthetic_benchmark(), synthetic_benchmark(n=5, seed=3)]
    benches[1] = type(benches[1])("other", "mem", benches[1].problems)
    rep, _ = run(benches)
    counts = expected_counts(benches)
    assert len(set(counts["synthetic"])) > 2  # the fake engine's correct counts vary
    for name, cs in counts.items():
        got = rep.summary[name]
        assert [r["correct"] for r in rep.records[name]] == cs
        assert got["n_problems"] == len(cs)
        assert got[f"avg@{K}"] == pytest.approx(sum(c / K for c in cs) / len(cs))
        assert got[f"pass@{K}"] == pytest.approx(sum(c > 0 for c in cs) / len(cs))
        assert got["pass@2"] == pytest.approx(sum(pass_at_k(K, c, 2) for c in cs) / len(cs))
        assert got["mean_response_tokens"] == pytest.approx(5 + (K - 1) / 2)
    avg = rep.summary["average"]
    assert avg[f"avg@{K}"] == pytest.approx(
        (rep.summary["synthetic"][f"avg@{K}"] + rep.summary["other"][f"avg@{K}"]) / 2
    )
    assert avg["n_problems"] == 21


def test_crash_then_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    benches = [synthetic_benchmark(n=10)]
    full, _ = run(benches)
    answers = {p.problem: p.answer for p in benches[0].problems}
    crashing = FakeEngine(answers, crash_after=6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(benches, tmp_path, engine=crashing)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 6  # meta + the six problems finished before the crash
    resumed, engine2 = run(benches, tmp_path)
    assert len(engine2.sampled) == 4 and not set(engine2.sampled) & set(crashing.sampled)
    assert resumed.n_resumed == 6 and resumed.n_sampled == 4
    assert resumed.records == full.records
    assert resumed.summary == full.summary
    # a third run samples nothing
    again, engine3 = run(benches, tmp_path)
    assert engine3.sampled == [] and again.summary == full.summary


def test_stop_after_then_resume_with_concurrency(tmp_path: Path) -> None:
    benches = [synthetic_benchmark(n=7)]
    full, _ = run(benches)
    part, e1 = run(benches, tmp_path, stop_after=3, concurrency=3)
    assert len(e1.sampled) == 3 and part.summary["synthetic"]["n_problems"] == 3
    rest, e2 = run(benches, tmp_path, concurrency=2)
    assert sorted(e1.sampled + e2.sampled) == sorted(
        f"synthetic/{p.uid}" for p in benches[0].problems
    )
    assert rest.records == full.records


def test_torn_last_line_is_redone(tmp_path: Path) -> None:
    benches = [synthetic_benchmark(n=3)]
    full, _ = run(benches, tmp_path)
    path = tmp_path / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:25])  # killed while writing the last one
    rep, engine = run(benches, tmp_path)
    assert engine.sampled == [f"synthetic/{benches[0].problems[-1].uid}"]
    assert rep.records == full.records
    assert len(path.read_text().splitlines()) == 4


def test_resume_with_other_settings_or_corrupt_file_fails(tmp_path: Path) -> None:
    benches = [synthetic_benchmark(n=2)]
    run(benches, tmp_path)
    with pytest.raises(ResumeError, match=r"k: file 4, now 8.*new --out"):
        run(benches, tmp_path, settings=settings(k=8))
    path = tmp_path / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "{not json\n" + "".join(lines[1:]))
    with pytest.raises(ResumeError, match=r"results.jsonl: line 2 is not a JSON object"):
        run(benches, tmp_path)


def test_run_eval_flat_metrics_and_report(tmp_path: Path) -> None:
    benches = [synthetic_benchmark(n=6)]
    answers = {p.problem: p.answer for p in benches[0].problems}
    from rlrt_megatron.data.templates import PromptTemplate

    metrics = run_eval(
        FakeEngine(answers),
        benches,
        K,
        tokenizer=CharTokenizer(),
        reward=exact_reward,
        template=PromptTemplate(use_chat_template=False),
        max_new_tokens=8,
    )
    counts = expected_counts(benches)["synthetic"]
    assert metrics[f"eval/synthetic/avg@{K}"] == pytest.approx(sum(counts) / (K * len(counts)))
    assert metrics[f"eval/average/pass@{K}"] == metrics[f"eval/synthetic/pass@{K}"]
    assert metrics["eval/synthetic/n_problems"] == 6
    rep, _ = run(benches)
    text = table_text(rep)
    assert "synthetic" in text and "average" in text and f"avg@{K}" in text
    pct = f"{100 * rep.summary['synthetic'][f'avg@{K}']:.1f}"
    assert pct in text
    csv = csv_text(rep).splitlines()
    assert csv[0].startswith(f"benchmark,k,n_problems,avg@{K},pass@1,pass@2,pass@{K}")
    assert csv[1].startswith(f"synthetic,{K},6,") and csv[2].startswith("average,")
    paths = write_report(rep, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["benchmarks"]["synthetic"][f"avg@{K}"] == rep.summary["synthetic"][f"avg@{K}"]
    assert data["settings"]["k"] == K


def test_real_math_reward_scores_the_fake_engine() -> None:
    from rlrt_megatron.reward.math import MathReward

    benches = [synthetic_benchmark(n=3)]
    answers = {p.problem: p.answer for p in benches[0].problems}
    with MathReward(num_workers=1) as reward:
        rep = evaluate(
            FakeEngine(answers),
            benches,
            settings(),
            tokenizer=CharTokenizer(),
            reward=reward,
        )
    assert [r["correct"] for r in rep.records["synthetic"]] == expected_counts(benches)["synthetic"]


# --------------------------------------------------------------------------- benchmark files
def test_data_dir_and_benchmark_file_loading(tmp_path: Path) -> None:
    write_synthetic_benchmark_dir(tmp_path, ["aime24", "amc23"], n=3)
    assert "question" in (tmp_path / "amc23.jsonl").read_text()  # AMC23's key
    benches = load_benchmarks("aime24,amc23,synthetic", data_dir=tmp_path, limit=2)
    assert [(b.name, len(b)) for b in benches] == [("aime24", 2), ("amc23", 2), ("synthetic", 2)]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"problem": ["What is 2 + 2?", "What is 3 * 3?"], "answer": [4, 9]}),
        tmp_path / "p.parquet",
    )
    (b,) = load_benchmarks(["math500"], files={"math500": str(tmp_path / "p.parquet")})
    assert [(p.problem, p.answer) for p in b.problems] == [
        ("What is 2 + 2?", "4"),
        ("What is 3 * 3?", "9"),
    ]


def test_malformed_benchmark_files_name_file_row_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "aime24.jsonl"
    write_jsonl([{"problem": "a", "answer": "1"}, {"problem": "b", "answer": "2"}], bad)
    with bad.open("a") as f:
        f.write(json.dumps({"problem": "c"}) + "\n")
    with pytest.raises(BenchmarkError, match=rf"aime24.*{bad}: line 3: missing key 'answer'"):
        load_benchmarks("aime24", data_dir=tmp_path)
    bad.write_text('{"problem": "a", "answer": "1"}\n{"problem": "b", answer: 2}\n')
    with pytest.raises(BenchmarkError, match=rf"{bad}: line 2: not valid JSON"):
        load_benchmarks("aime24", data_dir=tmp_path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"problem": ["x", "y", "z"], "answer": ["1", "2", ""]}), tmp_path / "hm.parquet"
    )
    with pytest.raises(BenchmarkError, match=r"hm.parquet: row 2: key 'answer' is empty"):
        load_benchmarks("hmmt26", files={"hmmt26": str(tmp_path / "hm.parquet")})
    with pytest.raises(BenchmarkError, match=r"amc23\.jsonl.*--benchmark-file amc23=PATH"):
        load_benchmarks("amc23", data_dir=tmp_path)
    with pytest.raises(BenchmarkError, match=r"--data-dir DIR"):
        load_benchmarks("aime25")


def test_load_benchmark_specs_for_the_trainer_config(tmp_path: Path) -> None:
    from rlrt_megatron.eval.benchmarks import load_benchmark_specs

    write_synthetic_benchmark_dir(tmp_path, ["aime24", "math500"], n=3)
    benches = load_benchmark_specs(
        [str(tmp_path / "aime24.jsonl"), f"mine={tmp_path / 'math500.jsonl'}", "synthetic"]
    )
    assert [(b.name, len(b)) for b in benches] == [("aime24", 3), ("mine", 3), ("synthetic", 16)]
    with pytest.raises(BenchmarkError, match="nope"):
        load_benchmark_specs(["nope"])


def test_cli_reports_a_malformed_benchmark_without_traceback(tmp_path: Path, capsys) -> None:
    from rlrt_megatron.cli import main

    (tmp_path / "amc23.jsonl").write_text(
        '{"question": "What is 1 + 1?", "answer": "2"}\n{"q": 1}\n'
    )
    argv = ["eval", "--ckpt", str(tmp_path), "--benchmarks", "amc23", "--data-dir", str(tmp_path)]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"rlrt eval: error: benchmark 'amc23': {tmp_path / 'amc23.jsonl'}: line 2: " in err
    assert "missing key 'problem'" in err and "Traceback" not in err
