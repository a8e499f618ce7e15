"""`rlrt data prepare dapo-math-17k`: the recipes' training set from a local Hugging Face download.

The paper recipes read `data/dapo-math-17k.parquet` (`data.prompt_key=prompt`,
`data.answer_key=reward_model.ground_truth`). The release (`BytedTsinghua-SIA/DAPO-Math-17k`)
is a parquet of ~1.79M rows in which each of the ~17k problems repeats about 100 times. This
reads the download (a parquet/jsonl file, or the directory `huggingface-cli download ...
--repo-type dataset --local-dir DIR` wrote), checks every row with the trainer's own loader
(`datasets.py`: the chat-list `prompt` with DAPO's "Answer:" wrapper, a non-empty
`reward_model.ground_truth`), drops the repeats (same problem text) and writes the remaining
rows unchanged, in the release's schema, to one parquet file. No network: the download is done
beforehand, on a machine that has it (docs/CLUSTER.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rlrt_megatron.data.datasets import (
    DEFAULT_FIELD_MAPS,
    DatasetError,
    _iter_path,
    _parse_row,
)

DATASETS = ("dapo-math-17k",)


@dataclass(frozen=True)
class PrepareReport:
    out: str
    rows_read: int
    rows_written: int
    duplicates: int

    def line(self) -> str:
        return (
            f"wrote {self.out}: {self.rows_written} problems ({self.rows_read} rows read, "
            f"{self.duplicates} repeats dropped)"
        )


def prepare_dapo_math(src: str | os.PathLike, out: str | os.PathLike) -> PrepareReport:
    """Deduplicated DAPO-Math-17k at `out` (parquet) from the local download `src`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src, out = Path(src), Path(out)
    if out.suffix != ".parquet":
        raise DatasetError(f"--out {out}: must end in .parquet (the recipes read parquet)")
    if out.resolve() == src.resolve():
        raise DatasetError(f"--out {out}: is the source; write the prepared file elsewhere")
    fmap = DEFAULT_FIELD_MAPS["dapo"]
    seen: set[str] = set()
    keep: list[dict] = []
    n = 0
    for where, row in _iter_path(src, None):
        n += 1
        if not (isinstance(row, dict) and "reward_model" in row):
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DatasetError(
                f"{where}: not a DAPO-Math-17k row (keys {keys}); expected `prompt` (chat list) "
                "and `reward_model.ground_truth`: point --src at the BytedTsinghua-SIA/"
                "DAPO-Math-17k download"
            )
        problem = _parse_row(where, row, "dapo", fmap, reprompt=True).problem
        if problem in seen:
            continue
        seen.add(problem)
        keep.append(row)
    if not keep:
        raise DatasetError(f"{src}: no rows; point --src at the DAPO-Math-17k download")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".parquet.tmp")
    pq.write_table(pa.Table.from_pylist(keep), tmp)
    os.replace(tmp, out)
    return PrepareReport(str(out), n, len(keep), n - len(keep))
