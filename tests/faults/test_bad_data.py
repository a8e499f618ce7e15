"""Case 8, bad data: a prompt that fails to render (a lone UTF-16 surrogate from a JSON
`\\ud800` escape: the tokenizer rejects it) and a prompt longer than `data.max_prompt_tokens`,
in the middle of the data file. With `data.on_bad_row=skip` both are dropped before the first
step and counted in every step's metrics (`data/skipped_bad_rows`, `data/skipped_too_long`);
with `error` the run stops naming the file, the prompt and the fix."""

from __future__ import annotations

import json
import subprocess

import pytest
from e2e_helpers import clean_env, metrics_rows, train_cmd

pytestmark = pytest.mark.faults

BAD = "what is 2 + \\ud800 3?"  # JSON text: one lone surrogate


def _write_data(path) -> None:
    lines = [
        json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}) for i in range(24)
    ]
    lines[9] = '{"problem": "' + BAD + '", "answer": "5"}'
    lines[15] = json.dumps({"problem": "Add these: " + " + ".join(["1"] * 400), "answer": "400"})
    path.write_text("\n".join(lines) + "\n")


def test_render_failure_and_long_prompt_are_skipped_and_counted(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from rlrt_megatron.data import load_prompt_dataset
    from rlrt_megatron.data.templates import filter_by_prompt_length

    tok = AutoTokenizer.from_pretrained(tiny_model["hf"])
    data = tmp_path / "data.jsonl"
    _write_data(data)
    ds = load_prompt_dataset(str(data), on_bad_row="skip")
    assert len(ds) == 24 and ds.n_skipped == 0  # the loader sees a non-empty string
    kept, too_long = filter_by_prompt_length(ds, tok, 128, on_bad_row="skip")
    assert len(kept) == 22 and too_long == 1 and kept.n_skipped == 1
    assert "prompt 9" in kept.skipped[0] and "failed to render" in kept.skipped[0]
    with pytest.raises(ValueError, match=r"data.jsonl: prompt 9 .*data.on_bad_row=skip"):
        filter_by_prompt_length(ds, tok, 128)


def test_bad_rows_mid_file_train_counted(tiny_model, tmp_path, fault_row):
    data, run_dir = tmp_path / "data.jsonl", str(tmp_path / "run")
    row = fault_row("8 bad rows mid-file (render failure, too long)", "rows 9 and 15 of 24",
                    "skipped and counted in every step's metrics; run finishes")  # fmt: skip
    _write_data(data)
    cmd = train_cmd(tiny_model, run_dir, "train.steps=2", f"data.path={data}",
                    "data.on_bad_row=skip", "data.max_prompt_tokens=128")  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=clean_env())
    assert out.returncode == 0, out.stderr[-3000:]
    rows = metrics_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["data/skipped_bad_rows"] == 1 and r["data/skipped_too_long"] == 1 for r in rows)
    row.update(exit=0, detect_s="before step 1", lost=0,
               observed="data/skipped_bad_rows=1, skipped_too_long=1, steps 1-2")  # fmt: skip
