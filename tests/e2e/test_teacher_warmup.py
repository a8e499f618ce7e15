"""The demo model's teacher reads its context (issue 23): the SFT warm-up renders
`model.sft_teacher_frac` of its examples with the teacher template, and its probe measures both
views on held-out problems (stored in `rlrt_sft.json`, printed by the warm-up)."""

from __future__ import annotations

import json
import os


def test_demo_teacher_is_better_than_the_student(tiny_model) -> None:
    with open(os.path.join(tiny_model["hf"], "rlrt_sft.json")) as f:
        info = json.load(f)
    assert info["config"]["teacher_frac"] > 0
    st = info["stats"]
    # before the fix: teacher 0.150 < student 0.242 (the teacher prompt was never seen)
    assert st["teacher_accuracy"] >= st["student_accuracy"] + 0.1, st
    assert 0.1 <= st["student_accuracy"] <= 0.6, st  # RL still has something to learn
