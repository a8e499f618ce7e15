"""The warmed demo model is cached by its warm-up settings: the teacher share (and template) are
part of the key, so a model warmed without the teacher format is never reused for the new demo."""

from __future__ import annotations

import json
import os

from recipes import get_recipe
from rlrt_megatron.convert import tiny
from rlrt_megatron.trainer import warmup


def test_teacher_share_is_part_of_the_cache_key(tmp_path, monkeypatch) -> None:
    built: list[float] = []

    def fake_make(out, seed=0, **_):
        os.makedirs(out, exist_ok=True)

    def fake_sft(d, cfg, log=print):
        built.append(cfg.model.sft_teacher_frac)
        return {"final_loss": 0.0}

    monkeypatch.setattr(tiny, "make_tiny_model", fake_make)
    monkeypatch.setattr(warmup, "sft_warmup", fake_sft)
    monkeypatch.setattr(
        warmup, "teacher_probe", lambda d, cfg: {"student_accuracy": 0.2, "teacher_accuracy": 0.5,
                                                 "probe_problems": 1, "probe_samples": 1}
    )  # fmt: skip
    hf = str(tmp_path / "hf")
    said: list[str] = []
    for frac in (0.0, 0.0, 0.5, 0.5, 0.25):
        cfg = get_recipe("tiny_demo", [f"model.sft_teacher_frac={frac}"])
        warmup.build_warm_tiny_model(hf, cfg, log=said.append)
    assert built == [0.0, 0.5, 0.25]
    with open(os.path.join(hf, "rlrt_sft.json")) as f:
        info = json.load(f)
    assert info["config"]["teacher_frac"] == 0.25 and info["stats"]["teacher_accuracy"] == 0.5
    assert any("accuracy student 0.200, teacher 0.500" in s for s in said)
