"""Prompt datasets: formats, field maps, bad rows, dedup, and the resumable sampler."""

from __future__ import annotations

import json

import pytest

from rlrt_megatron.data.datasets import (
    DAPO_PREFIX,
    DAPO_SUFFIX,
    DatasetError,
    PromptSampler,
    load_prompt_dataset,
    rows_to_dataset,
    write_jsonl,
)
from rlrt_megatron.data.synthetic import (
    arithmetic_dataset,
    synthetic_prompt_dataset,
    write_synthetic_jsonl,
)


def dapo_row(problem: str, answer: str) -> dict:
    """A row shaped like BytedTsinghua-SIA/DAPO-Math-17k."""
    return {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": DAPO_PREFIX + problem + DAPO_SUFFIX}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": "0f1e2d"},
    }


DAPO_ROWS = [dapo_row("What is 1+1?", "2"), dapo_row("Find x if 2x=6.", "3")] * 3 + [
    dapo_row("Compute 7*6.", "42")
]


def test_dapo_jsonl_dedup_and_reprompt(tmp_path):
    path = write_jsonl(DAPO_ROWS, tmp_path / "dapo.jsonl")
    ds = load_prompt_dataset(path)
    assert ds.fmt == "dapo"
    defaults = {"problem": "problem", "answer": "answer", "solution": "solution"}
    assert load_prompt_dataset(path, field_map=defaults).rows == ds.rows
    assert [r.problem for r in ds] == ["What is 1+1?", "Find x if 2x=6.", "Compute 7*6."]
    assert [r.answer for r in ds] == ["2", "3", "42"]
    assert ds.n_duplicates == 4 and ds.n_skipped == 0
    assert [r.row for r in ds] == [1, 2, 7]  # jsonl rows are 1-based line numbers
    # Without re-prompting the original DAPO instruction stays in the problem text.
    raw = load_prompt_dataset(path, reprompt=False, dedup=False)
    assert len(raw) == 7 and raw[0].problem.startswith("Solve the following math problem")


def test_dapo_parquet_and_save_to_disk(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(DAPO_ROWS), tmp_path / "dapo.parquet")
    ds = load_prompt_dataset(tmp_path / "dapo.parquet")
    assert [r.answer for r in ds] == ["2", "3", "42"] and ds.n_duplicates == 4
    assert ds[2].row == 6  # 0-based index in parquet

    hf = datasets.Dataset.from_list(DAPO_ROWS)
    hf.save_to_disk(str(tmp_path / "hf"))
    ds2 = load_prompt_dataset(tmp_path / "hf")
    assert [r.problem for r in ds2] == [r.problem for r in ds]
    datasets.DatasetDict({"train": hf, "test": hf.select([6])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DatasetError, match="pass split="):
        load_prompt_dataset(tmp_path / "dd")
    assert [r.answer for r in load_prompt_dataset(tmp_path / "dd", split="test")] == ["42"]


def test_open_r1_processed_string_prompt(tmp_path):
    row = {"prompt": "What is 3+4?", "solution": "7", "reward_model": {"ground_truth": "7"}}
    ds = load_prompt_dataset(write_jsonl([row], tmp_path / "p.jsonl"))
    assert (ds.fmt, ds[0].problem, ds[0].answer) == ("dapo", "What is 3+4?", "7")


def test_simple_format_field_map_and_numbers(tmp_path):
    rows = [
        {"problem": "p1", "answer": "1", "solution": "because 1"},
        {"question": "p2", "answer": 204},  # AMC23 spells it `question`; AIME-like int answers
        {"problem": [{"role": "user", "content": "p3"}], "answer": 0.5},
    ]
    ds = load_prompt_dataset(write_jsonl(rows, tmp_path / "s.jsonl"))
    assert ds.fmt == "simple"
    assert [(r.problem, r.answer, r.solution) for r in ds] == [
        ("p1", "1", "because 1"),
        ("p2", "204", None),
        ("p3", "0.5", None),
    ]
    assert ds[0].reference_text() == "because 1"
    assert ds[1].reference_text() == "The answer is \\boxed{204}."
    nested = [{"q": {"text": "p"}, "meta": {"gold": ["x", "9"]}}]
    ds = load_prompt_dataset(
        write_jsonl(nested, tmp_path / "n.jsonl"),
        field_map={"problem": "q.text", "answer": "meta.gold.1"},
    )
    assert (ds[0].problem, ds[0].answer) == ("p", "9")
    with pytest.raises(DatasetError, match="unknown field_map keys"):
        load_prompt_dataset(tmp_path / "n.jsonl", field_map={"prompt": "q"})


@pytest.mark.parametrize(
    "bad, key, what",
    [
        ({"answer": "1"}, "'problem'", "missing key"),
        ({"problem": "p", "answer": "  "}, "'answer'", "is empty"),
        ({"problem": "p", "answer": ["1"]}, "'answer'", "must be a string or a number"),
        ({"problem": "p", "answer": True}, "'answer'", "must be a string or a number"),
        ({"problem": "p"}, "'answer'", "missing key"),
        ({"problem": 3, "answer": "1"}, "'problem'", "non-empty string"),
        ({"problem": "p", "answer": "1", "solution": 5}, "'solution'", "must be a string"),
    ],
)
def test_bad_rows_error_names_file_row_key(tmp_path, bad, key, what):
    rows = [{"problem": "ok", "answer": "1"}, bad, {"problem": "ok2", "answer": "2"}]
    path = write_jsonl(rows, tmp_path / "bad.jsonl")
    with pytest.raises(DatasetError) as ei:
        load_prompt_dataset(path)
    msg = str(ei.value)
    assert str(path) in msg and "line 2" in msg and key in msg and what in msg
    assert "on_bad_row=skip" in msg
    ds = load_prompt_dataset(path, on_bad_row="skip")
    assert [r.problem for r in ds] == ["ok", "ok2"] and ds.n_skipped == 1
    assert "line 2" in ds.skipped[0]


def test_file_level_errors(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"problem": "a", "answer": "1"}\n{not json\n')
    with pytest.raises(DatasetError, match=r"broken.jsonl: line 2: not valid JSON"):
        load_prompt_dataset(tmp_path / "broken.jsonl")
    with pytest.raises(DatasetError, match="no such file"):
        load_prompt_dataset(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="unknown dataset file type"):
        load_prompt_dataset(tmp_path / "x.csv")
    (tmp_path / "allbad.jsonl").write_text(json.dumps({"answer": "1"}) + "\n")
    with pytest.raises(DatasetError, match="no usable rows"):
        load_prompt_dataset(tmp_path / "allbad.jsonl", on_bad_row="skip")


def test_synthetic_roundtrip(tmp_path):
    path = write_synthetic_jsonl(tmp_path / "train.jsonl", n=50, seed=3)
    ds = load_prompt_dataset(path, dedup=False)
    assert [(r.problem, r.answer) for r in ds] == [
        (r["problem"], r["answer"]) for r in arithmetic_dataset(50, seed=3)
    ]
    mem = synthetic_prompt_dataset(50, seed=3)
    assert [r.problem for r in mem] == [r.problem for r in ds]
    assert rows_to_dataset(arithmetic_dataset(2))[0].solution.endswith("}.")


def test_sampler_epochs_cover_dataset_and_resume_exactly():
    s = PromptSampler(10, batch_size=3, seed=7)
    first_epoch = [s.next_indices() for _ in range(3)]
    flat = sorted(i for b in first_epoch for i in b)
    assert len(set(flat)) == 9 and s.epoch == 0  # one row of the epoch's remainder is dropped
    nxt = s.next_indices()
    assert s.epoch == 1 and len(nxt) == 3
    # Run A: 8 batches straight. Run B: 3 batches, save, new sampler, load, 5 more.
    a = PromptSampler(10, 3, seed=7)
    run_a = [a.next_indices() for _ in range(8)]
    b = PromptSampler(10, 3, seed=7)
    run_b = [b.next_indices() for _ in range(3)]
    state = json.loads(json.dumps(b.state_dict()))  # survives a JSON trainer-state file
    c = PromptSampler(10, 3, seed=7)
    c.load_state_dict(state)
    run_b += [c.next_indices() for _ in range(5)]
    assert run_a == run_b
    assert PromptSampler(10, 3, seed=8).next_indices() != run_a[0]
    assert PromptSampler(10, 3, shuffle=False).next_indices() == [0, 1, 2]


def test_sampler_errors():
    with pytest.raises(ValueError, match="fewer than one batch"):
        PromptSampler(2, batch_size=3)
    s = PromptSampler(10, 3, seed=1)
    with pytest.raises(ValueError, match="batch_size=3 but this run has batch_size=2"):
        PromptSampler(10, 2, seed=1).load_state_dict(s.state_dict())
