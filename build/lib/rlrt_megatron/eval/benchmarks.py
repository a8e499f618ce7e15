"""The math benchmarks of the RLRT paper, read from local files (no machine here downloads them).

Names and the public datasets they come from (fields checked against the releases):

=========  ==============================  ==================  ========
name       Hugging Face dataset            fields              problems
=========  ==============================  ==================  ========
aime24     HuggingFaceH4/aime_2024         problem / answer    30
aime25     math-ai/aime25                  problem / answer    30
aime26     MathArena/aime_2026             problem / answer    30
hmmt26     MathArena/hmmt_feb_2026         problem / answer    (all)
amc23      math-ai/amc23                   question / answer   40
math500    HuggingFaceH4/MATH-500          problem / answer    500
synthetic  built in (data/synthetic.py)    problem / answer    16
=========  ==============================  ==================  ========

File formats (anything `data.load_prompt_dataset` reads, in the "simple" format):

- ``.jsonl``: one JSON object per line, ``{"problem": "...", "answer": "..."}`` (``question``
  instead of ``problem`` also works; the answer may be a string or a number; other keys are
  ignored);
- ``.parquet`` / ``.json`` (a list of such objects) with the same columns;
- a ``datasets.save_to_disk`` directory (a ``Dataset``, or a ``DatasetDict`` with one split, or
  pick one with ``name=PATH#split``).

Where each benchmark is read from: ``--benchmark-file name=PATH`` if given, else
``DATA_DIR/<name>.jsonl``, ``.parquet``, ``.json`` or ``DATA_DIR/<name>/`` (first that exists).
Making the files on a machine with internet access, e.g.::

    python -c "import datasets; datasets.load_dataset('HuggingFaceH4/aime_2024',
        split='train').to_json('data/eval/aime24.jsonl')"

A malformed row (missing problem or answer, empty answer, wrong type, bad JSON) raises
`BenchmarkError` naming the benchmark, the file, the line/row and the key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rlrt_megatron.data.datasets import DatasetError, load_prompt_dataset, write_jsonl
from rlrt_megatron.data.synthetic import arithmetic_dataset


class BenchmarkError(ValueError):
    """A benchmark cannot be found or read; the message names the file, row, key and the fix."""


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a named benchmark comes from and how its rows are read."""

    name: str
    source: str  # the public dataset (for the docs and error messages)
    problem_key: str = "problem"
    answer_key: str = "answer"
    size: int | None = None  # problems in the public release, None = not fixed here


BENCHMARKS: dict[str, BenchmarkSpec] = {
    s.name: s
    for s in (
        BenchmarkSpec("aime24", "HuggingFaceH4/aime_2024", size=30),
        BenchmarkSpec("aime25", "math-ai/aime25", size=30),
        BenchmarkSpec("aime26", "MathArena/aime_2026", size=30),
        BenchmarkSpec("hmmt26", "MathArena/hmmt_feb_2026"),
        BenchmarkSpec("amc23", "math-ai/amc23", problem_key="question", size=40),
        BenchmarkSpec("math500", "HuggingFaceH4/MATH-500", size=500),
    )
}
PAPER_BENCHMARKS = tuple(BENCHMARKS)  # the six sets the paper reports, in its column order
SYNTHETIC = "synthetic"
SYNTHETIC_SEED = 9001  # not the training data's seed (0 / train.seed): held-out problems
SYNTHETIC_SIZE = 16
FILE_SUFFIXES = (".jsonl", ".parquet", ".json")


@dataclass(frozen=True)
class BenchProblem:
    """One problem of a benchmark: its 0-based position, text, reference answer and a content
    hash (``uid`` = ``<index>:<sha1(problem, answer)[:12]>``) that resume files are keyed by."""

    index: int
    problem: str
    answer: str
    uid: str
    source_row: int = -1  # jsonl: 1-based line number, else 0-based row (for messages)


@dataclass(frozen=True)
class Benchmark:
    """A loaded benchmark: its name, where it was read from and its problems (file order)."""

    name: str
    path: str
    problems: tuple[BenchProblem, ...]

    def __len__(self) -> int:
        return len(self.problems)


def problem_uid(index: int, problem: str, answer: str) -> str:
    digest = hashlib.sha1(f"{problem}\x00{answer}".encode()).hexdigest()[:12]
    return f"{index}:{digest}"


def _make(name: str, path: str, rows: Iterable[tuple[str, str, int]]) -> Benchmark:
    problems = tuple(
        BenchProblem(i, p, a, problem_uid(i, p, a), r) for i, (p, a, r) in enumerate(rows)
    )
    return Benchmark(name=name, path=path, problems=problems)


def synthetic_benchmark(
    n: int = SYNTHETIC_SIZE, seed: int = SYNTHETIC_SEED, max_operand: int = 9
) -> Benchmark:
    """The built-in tiny set: `n` arithmetic problems (`What is 7 + 3?` -> `10`)."""
    rows = arithmetic_dataset(n, seed=seed, max_operand=max_operand)
    return _make(
        SYNTHETIC,
        "<built-in synthetic>",
        ((r["problem"], r["answer"], i) for i, r in enumerate(rows)),
    )


def find_benchmark_file(name: str, data_dir: str | Path) -> Path:
    """`DATA_DIR/<name>.jsonl|.parquet|.json` or `DATA_DIR/<name>/`, the first that exists."""
    d = Path(data_dir)
    candidates = [d / f"{name}{s}" for s in FILE_SUFFIXES] + [d / name]
    for c in candidates:
        if c.exists():
            return c
    spec = BENCHMARKS.get(name)
    hint = (
        f" (from {spec.source}; e.g. on a machine with internet: datasets.load_dataset("
        f"'{spec.source}', split=...).to_json('{d / (name + '.jsonl')}'))"
        if spec
        else ""
    )
    raise BenchmarkError(
        f"benchmark {name!r}: none of {', '.join(str(c) for c in candidates)} exists; put the "
        f"benchmark there{hint} or pass --benchmark-file {name}=PATH"
    )


def load_benchmark_file(name: str, path: str | Path, split: str | None = None) -> Benchmark:
    """Read one benchmark file (format: module docstring). Rows keep the file order; duplicates
    are kept (a benchmark is scored as released)."""
    # the simple format reads `problem` (falling back to `question`, AMC23's key) and `answer`
    try:
        ds = load_prompt_dataset(path, fmt="simple", split=split, reprompt=False, dedup=False)
    except DatasetError as e:
        raise BenchmarkError(f"benchmark {name!r}: {e}") from e
    return _make(name, str(path), ((r.problem, r.answer, r.row) for r in ds.rows))


def parse_benchmark_files(items: Sequence[str]) -> dict[str, str]:
    """`["aime24=/p/a.jsonl", ...]` (the repeated `--benchmark-file` option) -> {name: path}."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise BenchmarkError(
                f"--benchmark-file {item!r}: expected NAME=PATH (e.g. aime24=data/aime24.jsonl)"
            )
        out[name.strip()] = path.strip()
    return out


def load_benchmarks(
    names: Sequence[str] | str,
    data_dir: str | Path | None = None,
    files: dict[str, str] | None = None,
    limit: int | None = None,
) -> list[Benchmark]:
    """Load benchmarks by name (a list or a comma-separated string).

    Each name is read from `files[name]` (`PATH` or `PATH#split`), else from `data_dir`
    (`find_benchmark_file`); `synthetic` is built in. A name that is not one of the paper's six
    needs a file. `limit` keeps the first `limit` problems of each (quick looks, smoke tests).
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    files = dict(files or {})
    if not names:
        raise BenchmarkError(
            "no benchmarks given; pass e.g. --benchmarks aime24,amc23 (known: "
            f"{', '.join([*BENCHMARKS, SYNTHETIC])})"
        )
    dup = sorted({n for n in names if list(names).count(n) > 1})
    if dup:
        raise BenchmarkError(f"--benchmarks lists {dup} more than once; name each once")
    out = []
    for name in names:
        if name in files:
            path, _, split = files[name].partition("#")
            bench = load_benchmark_file(name, path, split or None)
        elif name == SYNTHETIC:
            bench = synthetic_benchmark()
        elif data_dir is not None:
            bench = load_benchmark_file(name, find_benchmark_file(name, data_dir))
        else:
            known = ", ".join([*BENCHMARKS, SYNTHETIC])
            raise BenchmarkError(
                f"benchmark {name!r}: no file for it; pass --data-dir DIR (with DIR/{name}.jsonl)"
                f" or --benchmark-file {name}=PATH (known names: {known})"
            )
        if limit is not None:
            bench = Benchmark(bench.name, bench.path, bench.problems[:limit])
        out.append(bench)
    return out


def load_benchmark_specs(
    specs: Sequence[str], data_dir: str | Path | None = None, limit: int | None = None
) -> list[Benchmark]:
    """Benchmarks from config-style strings (the trainer's `eval.datasets`): each is
    `NAME=PATH` (`PATH#split` for a DatasetDict), a file or save_to_disk directory `PATH` (named
    by its stem: `data/aime24.jsonl` -> aime24), or a name resolved like `--benchmarks`
    (`synthetic`, or one of the six with `data_dir`)."""
    names: list[str] = []
    files: dict[str, str] = {}
    for spec in specs:
        spec = str(spec).strip()
        if "=" in spec:
            ((name, path),) = parse_benchmark_files([spec]).items()
        elif Path(spec.partition("#")[0]).exists():
            name, path = Path(spec.partition("#")[0]).stem, spec
        else:
            name, path = spec, ""
        names.append(name)
        if path:
            files[name] = path
    return load_benchmarks(names, data_dir=data_dir, files=files, limit=limit)


def write_synthetic_benchmark_dir(
    data_dir: str | Path, names: Sequence[str] = PAPER_BENCHMARKS, n: int = 4, seed: int = 1
) -> Path:
    """Write `DATA_DIR/<name>.jsonl` with `n` synthetic problems for each name (demo and tests
    of the file path; `amc23` uses the `question` key like the real release)."""
    d = Path(data_dir)
    for i, name in enumerate(names):
        rows = arithmetic_dataset(n, seed=seed + i, max_operand=9)
        key = BENCHMARKS[name].problem_key if name in BENCHMARKS else "problem"
        write_jsonl(({key: r["problem"], "answer": r["answer"]} for r in rows), d / f"{name}.jsonl")
    return d
