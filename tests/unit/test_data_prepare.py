"""`rlrt data prepare dapo-math-17k` on a small file the test writes in the release's schema
(`BytedTsinghua-SIA/DAPO-Math-17k`: data_source, chat-list prompt, ability, reward_model,
extra_info; problems repeated): repeats dropped, rows unchanged, readable by the recipes' keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rlrt_megatron.data import load_prompt_dataset
from rlrt_megatron.data.datasets import DAPO_PREFIX, DAPO_SUFFIX

REPO = Path(__file__).resolve().parents[2]


def dapo_row(i: int, problem: str, answer: str) -> dict:
    return {
        "data_source": "math_dapo",
        "prompt": [{"content": DAPO_PREFIX + problem + DAPO_SUFFIX, "role": "user"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": f"id-{i}"},
    }


def test_prepare_dapo_math_from_a_download_dir(tmp_path):
    problems = [("What is 2+3?", "5"), ("Find x if 2x=8.", "4"), ("Compute 7*6.", "42")]
    rows = [dapo_row(i, *problems[i % 3]) for i in range(10)]  # 4 + 3 + 3 repeats
    dl = tmp_path / "dl" / "data"
    dl.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:6]), dl / "dapo-math-17k-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[6:]), dl / "dapo-math-17k-00001.parquet")
    out = tmp_path / "data" / "dapo-math-17k.parquet"
    p = subprocess.run([sys.executable, "-m", "rlrt_megatron.cli", "data", "prepare",
                        "dapo-math-17k", "--src", str(tmp_path / "dl"), "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"wrote {out}: 3 problems (10 rows read, 7 repeats dropped)"
    written = pq.read_table(out).to_pylist()
    assert written == rows[:3]  # first occurrences, unchanged, in the release's schema
    # what the recipes read (data.prompt_key=prompt, data.answer_key=reward_model.ground_truth)
    ds = load_prompt_dataset(out, field_map={"problem": "prompt",
                                             "answer": "reward_model.ground_truth"})  # fmt: skip
    assert [(r.problem, r.answer) for r in ds.rows] == problems and ds.n_duplicates == 0


def test_prepare_refuses_a_file_that_is_not_dapo(tmp_path):
    src = tmp_path / "x.jsonl"
    src.write_text('{"problem": "1+1", "answer": "2"}\n')
    p = subprocess.run([sys.executable, "-m", "rlrt_megatron.cli", "data", "prepare",
                        "dapo-math-17k", "--src", str(src), "--out", str(tmp_path / "o.parquet")],
                       capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip
    assert p.returncode == 2 and "not a DAPO-Math-17k row (keys ['answer', 'problem'])" in p.stderr
    assert not (tmp_path / "o.parquet").exists()
