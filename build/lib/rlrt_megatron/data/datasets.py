"""Prompt datasets: jsonl / json / parquet files or a `datasets.save_to_disk` directory.

Two formats, detected from the first row with `fmt="auto"`:

- `dapo` (DAPO-Math-17k): `prompt` is a chat list whose last user message wraps the problem in
  DAPO's "Answer:" instructions; the reference is `reward_model.ground_truth`. With `reprompt=True`
  (default) the wrapper is removed so the problem can be re-prompted for `\\boxed{}` by
  `data/templates.py`. Rows repeat ~100x in the original release: duplicates (same problem text)
  are dropped and counted. `open-r1/DAPO-Math-17k-Processed` (a string `prompt`) also loads.
- `simple`: `{"problem" (or "question"), "answer", "solution"?}`; `problem` may be a chat list.

`field_map` overrides where a field is read from, by dotted path (`reward_model.ground_truth`,
`prompt.0.content`): keys `problem`, `answer`, `solution`. For DAPO files, entries equal to the
simple format's names (`problem`, `answer`, `solution`) are ignored, so a config that always
passes its defaults still loads DAPO. A bad row (missing field, empty answer,
wrong type) raises `DatasetError` naming the file, the row and the key, or with `on_bad_row="skip"`
is skipped and counted in `PromptDataset.n_skipped` (reasons in `PromptDataset.skipped`).

`PromptSampler` walks the dataset in seeded per-epoch permutations; its `state_dict()` (epoch and
cursor) makes a resumed run draw exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of "
    "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'

FORMATS = ("auto", "dapo", "simple")
DEFAULT_FIELD_MAPS: dict[str, dict[str, str | None]] = {
    "dapo": {"problem": "prompt", "answer": "reward_model.ground_truth", "solution": None},
    "simple": {"problem": "problem", "answer": "answer", "solution": "solution"},
}
_MISSING = object()


class DatasetError(ValueError):
    """A dataset file or row is unusable; the message names file, row, key and the fix."""


@dataclass(frozen=True)
class PromptRow:
    """One problem: the bare question text, its reference answer and an optional solution.

    `problem` is what the template renders (DAPO's "Answer:" wrapper removed when re-prompting);
    `row` is the row number in the source file (jsonl: 1-based line number, else 0-based index).
    """

    problem: str
    answer: str
    solution: str | None = None
    row: int = -1

    def reference_text(self) -> str:
        """The RLSD teacher's reference: the worked solution if present, else the boxed answer."""
        return self.solution if self.solution else f"The answer is \\boxed{{{self.answer}}}."


@dataclass
class PromptDataset(Sequence[PromptRow]):
    """Loaded prompts (a read-only sequence of `PromptRow`) and what loading dropped."""

    rows: list[PromptRow]
    path: str = ""
    fmt: str = "simple"
    n_skipped: int = 0
    n_duplicates: int = 0
    skipped: list[str] = field(default_factory=list)  # first reasons, for the log

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):  # type: ignore[override]
        return self.rows[i]

    def __iter__(self) -> Iterator[PromptRow]:
        return iter(self.rows)

    def stats(self) -> dict[str, int]:
        return {
            "data/n_prompts": len(self.rows),
            "data/n_skipped": self.n_skipped,
            "data/n_duplicates": self.n_duplicates,
        }


# --------------------------------------------------------------------------- reading files
def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(
                    f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line of a .jsonl "
                    "file must be one JSON object"
                ) from e


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DatasetError(
            f"{path}: a .json dataset must be a list of row objects (or {{'data': [...]}}); "
            "use .jsonl for one object per line"
        )
    for i, row in enumerate(data):
        yield f"{path}: row {i}", row


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    i = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            yield f"{path}: row {i}", row
            i += 1


def _iter_hf_dir(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds.keys())
        if split is None:
            if len(names) != 1:
                raise DatasetError(
                    f"{path}: a DatasetDict with splits {names}; pass split=<one of them>"
                )
            split = names[0]
        if split not in ds:
            raise DatasetError(f"{path}: no split {split!r}; available: {names}")
        ds = ds[split]
    for i, row in enumerate(ds):
        yield f"{path} [{split or 'dataset'}]: row {i}", row


def _iter_path(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            yield from _iter_hf_dir(path, split)
            return
        files = sorted(
            p
            for p in path.rglob("*")
            if p.suffix in (".jsonl", ".parquet", ".json") and p.is_file()
        )
        if split is not None:
            files = [p for p in files if split in p.name] or files
        if not files:
            raise DatasetError(
                f"{path}: a directory with no .jsonl/.parquet/.json files and no "
                "`datasets.save_to_disk` metadata; pass a file or a save_to_disk directory"
            )
        for p in files:
            yield from _iter_path(p, None)
        return
    if not path.exists():
        raise DatasetError(f"{path}: no such file or directory; check data.path")
    suffix = "".join(path.suffixes[-1:])
    if suffix == ".jsonl":
        yield from _iter_jsonl(path)
    elif suffix == ".json":
        yield from _iter_json(path)
    elif suffix == ".parquet":
        yield from _iter_parquet(path)
    else:
        raise DatasetError(
            f"{path}: unknown dataset file type {suffix!r}; use .jsonl, .json, .parquet or a "
            "`datasets.save_to_disk` directory"
        )


# --------------------------------------------------------------------------- field access
def get_dotted(row: Any, dotted: str) -> Any:
    """`row["a"]["b"][0]` for `"a.b.0"`; returns a private sentinel when absent."""
    cur = row
    for part in dotted.split("."):
        if isinstance(cur, dict):
            if part not in cur:
                return _MISSING
            cur = cur[part]
        elif isinstance(cur, (list, tuple)) and part.lstrip("-").isdigit():
            idx = int(part)
            if not -len(cur) <= idx < len(cur):
                return _MISSING
            cur = cur[idx]
        else:
            return _MISSING
    return cur


def _detect_format(row: Any) -> str:
    if isinstance(row, dict) and get_dotted(row, "reward_model.ground_truth") is not _MISSING:
        return "dapo"
    return "simple"


def _chat_to_text(value: Any) -> str | None:
    """The last user message of a chat list (or the string itself); None if neither."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value:
        users = [m for m in value if isinstance(m, dict) and m.get("role") == "user"]
        msg = users[-1] if users else value[-1]
        if isinstance(msg, dict) and isinstance(msg.get("content"), str):
            return msg["content"]
    return None


def strip_dapo_wrapper(text: str) -> str:
    """Remove DAPO-Math-17k's "Answer:" instructions around the problem (no-op if absent)."""
    if text.startswith(DAPO_PREFIX):
        text = text[len(DAPO_PREFIX) :]
    if text.endswith(DAPO_SUFFIX):
        text = text[: -len(DAPO_SUFFIX)]
    return text.strip()


def _answer_to_str(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value) if not value.is_integer() else str(int(value))
    return None


def _row_number(where: str) -> int:
    tail = where.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def _parse_row(
    where: str, row: Any, fmt: str, fmap: dict[str, str | None], reprompt: bool
) -> PromptRow:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object per row, got {type(row).__name__}")
    pkey, akey, skey = fmap["problem"], fmap["answer"], fmap.get("solution")
    assert pkey and akey
    raw_p = get_dotted(row, pkey)
    if raw_p is _MISSING and fmt == "simple" and pkey == "problem" and "question" in row:
        pkey, raw_p = "question", row["question"]  # AMC23 and friends call it `question`
    if raw_p is _MISSING:
        raise DatasetError(
            f"{where}: missing key {pkey!r} (the problem); row keys are {sorted(row)}; set "
            f"field_map problem=<dotted path> (data.prompt_key) or use on_bad_row=skip"
        )
    problem = _chat_to_text(raw_p)
    if problem is None or not problem.strip():
        raise DatasetError(
            f"{where}: key {pkey!r} must be a non-empty string or a chat list with a user "
            f"message, got {type(raw_p).__name__} {str(raw_p)[:80]!r}; fix the row or use "
            "on_bad_row=skip"
        )
    if fmt == "dapo" and reprompt:
        problem = strip_dapo_wrapper(problem)
    raw_a = get_dotted(row, akey)
    if raw_a is _MISSING:
        raise DatasetError(
            f"{where}: missing key {akey!r} (the reference answer); row keys are {sorted(row)}; "
            "set field_map answer=<dotted path> (data.answer_key) or use on_bad_row=skip"
        )
    answer = _answer_to_str(raw_a)
    if answer is None:
        raise DatasetError(
            f"{where}: key {akey!r} must be a string or a number, got {type(raw_a).__name__}; "
            "fix the row or use on_bad_row=skip"
        )
    if not answer:
        raise DatasetError(
            f"{where}: key {akey!r} is empty; every problem needs a reference answer (fix the "
            "row or use on_bad_row=skip)"
        )
    solution = None
    if skey:
        raw_s = get_dotted(row, skey)
        if raw_s is not _MISSING and raw_s is not None:
            if not isinstance(raw_s, str):
                raise DatasetError(
                    f"{where}: key {skey!r} (the solution) must be a string, got "
                    f"{type(raw_s).__name__}; fix the row, drop the key or use on_bad_row=skip"
                )
            solution = raw_s.strip() or None
    return PromptRow(
        problem=problem.strip(), answer=answer, solution=solution, row=_row_number(where)
    )


def load_prompt_dataset(
    path: str | Path,
    field_map: dict[str, str | None] | None = None,
    fmt: Literal["auto", "dapo", "simple"] = "auto",
    on_bad_row: Literal["error", "skip"] = "error",
    *,
    split: str | None = None,
    reprompt: bool = True,
    dedup: bool = True,
    limit: int | None = None,
) -> PromptDataset:
    """Load prompts from a .jsonl / .json / .parquet file, a directory of them, or a
    `datasets.save_to_disk` directory (`split` picks one split of a DatasetDict).

    Args:
        field_map: dotted paths overriding the format's fields (`problem`, `answer`, `solution`).
        fmt: `auto` detects DAPO (a `reward_model.ground_truth` field) or simple.
        on_bad_row: `error` raises `DatasetError` at the first bad row; `skip` drops and counts.
        reprompt: remove DAPO's "Answer:" wrapper so the template can ask for `\\boxed{}`.
        dedup: drop rows whose problem text was already seen (counted in `n_duplicates`).
        limit: stop after this many kept rows.
    """
    if fmt not in FORMATS:
        raise DatasetError(f"load_prompt_dataset: fmt={fmt!r}; choose one of {FORMATS}")
    if on_bad_row not in ("error", "skip"):
        raise DatasetError(f"load_prompt_dataset: on_bad_row={on_bad_row!r}; choose error or skip")
    unknown = set(field_map or {}) - {"problem", "answer", "solution"}
    if unknown:
        raise DatasetError(
            f"load_prompt_dataset: unknown field_map keys {sorted(unknown)}; the keys are "
            "problem, answer, solution (values: dotted paths in the row)"
        )
    path = Path(path)
    out = PromptDataset(rows=[], path=str(path), fmt=fmt)
    seen: set[str] = set()
    fmap: dict[str, str | None] | None = None
    for where, row in _iter_path(path, split):
        if fmap is None:
            if out.fmt == "auto":
                out.fmt = _detect_format(row)
            fmap = dict(DEFAULT_FIELD_MAPS[out.fmt])
            simple = DEFAULT_FIELD_MAPS["simple"]
            for k, v in (field_map or {}).items():
                # A config that always passes the simple defaults (data.prompt_key=problem ...)
                # must still load DAPO files: those entries keep the DAPO fields.
                if v is not None and not (out.fmt == "dapo" and v == simple[k]):
                    fmap[k] = v
        try:
            prow = _parse_row(where, row, out.fmt, fmap, reprompt)
        except DatasetError as e:
            if on_bad_row == "error":
                raise
            out.n_skipped += 1
            if len(out.skipped) < 20:
                out.skipped.append(str(e))
            continue
        if dedup:
            if prow.problem in seen:
                out.n_duplicates += 1
                continue
            seen.add(prow.problem)
        out.rows.append(prow)
        if limit is not None and len(out.rows) >= limit:
            break
    if not out.rows:
        raise DatasetError(
            f"{path}: no usable rows (read with format {out.fmt!r}, {out.n_skipped} skipped"
            + (f"; first reason: {out.skipped[0]}" if out.skipped else "")
            + "); check data.path and the field map"
        )
    if out.fmt == "auto":  # pragma: no cover - set at the first row
        out.fmt = "simple"
    return out


def rows_to_dataset(rows: Iterable[dict], name: str = "<memory>") -> PromptDataset:
    """A `PromptDataset` from in-memory simple-format dicts (e.g. `arithmetic_dataset`)."""
    fmap = DEFAULT_FIELD_MAPS["simple"]
    out = PromptDataset(rows=[], path=name, fmt="simple")
    for i, row in enumerate(rows):
        out.rows.append(_parse_row(f"{name}: row {i}", row, "simple", fmap, False))
    return out


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """Write rows as JSON lines (UTF-8), creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# --------------------------------------------------------------------------- sampler
class PromptSampler:
    """Deterministic, resumable batches of prompt indices.

    Epoch `e` visits the dataset in the permutation `random.Random(f"{seed}:{e}")` (or in order
    with `shuffle=False`); a batch never spans two epochs (the remainder of an epoch, fewer than
    `batch_size` rows, is dropped). `state_dict()` = `{epoch, cursor, ...}`; after
    `load_state_dict()` the next batches are exactly those the original run drew next.
    """

    def __init__(
        self, dataset: Sequence[Any] | int, batch_size: int, seed: int = 0, shuffle: bool = True
    ) -> None:
        self.size = dataset if isinstance(dataset, int) else len(dataset)
        if batch_size < 1:
            raise ValueError(f"PromptSampler: batch_size={batch_size} must be >= 1")
        if self.size < batch_size:
            raise ValueError(
                f"PromptSampler: the dataset has {self.size} prompts, fewer than one batch "
                f"({batch_size}); use more data or a smaller train.prompts_per_step"
            )
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.cursor = 0  # next position in the epoch's permutation
        self._perm: list[int] | None = None

    def _permutation(self) -> list[int]:
        if self._perm is None:
            perm = list(range(self.size))
            if self.shuffle:
                random.Random(f"{self.seed}:{self.epoch}").shuffle(perm)
            self._perm = perm
        return self._perm

    @property
    def batches_per_epoch(self) -> int:
        return self.size // self.batch_size

    def next_indices(self) -> list[int]:
        """The next batch of dataset indices (advances the cursor)."""
        if self.cursor + self.batch_size > self.size:
            self.epoch += 1
            self.cursor = 0
            self._perm = None
        perm = self._permutation()
        out = perm[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return out

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_indices()

    def state_dict(self) -> dict[str, int | bool]:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "seed": self.seed,
            "size": self.size,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("size", "batch_size", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"PromptSampler.load_state_dict: checkpoint has {key}={state[key]} but this "
                    f"run has {key}={getattr(self, key)}; resume with the same data and "
                    "batch settings (or start a fresh run)"
                )
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._perm = None
