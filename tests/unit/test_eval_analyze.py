"""Pure parts of `rlrt analyze`: flip rates, insertion positions, explore/exploit ranking."""

from __future__ import annotations

import math

import pytest
import torch

from rlrt_megatron.eval.analyze import (
    Rollout,
    explore_exploit_tokens,
    flip_rates,
    injection_positions,
    token_text,
)

EOS = 99


class Tok:
    """Token id -> a fixed string; 7 is half of a multi-byte character."""

    names = {1: "a", 2: " b", 3: "\n", 4: "c", 5: "d", 7: "\ufffd", EOS: "<eos>"}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(self.names[i] for i in ids)

    def convert_ids_to_tokens(self, i: int) -> str:
        return "âĢ" if i == 7 else self.names[i]


def rollout(ids, delta, reward, key=0) -> Rollout:
    s = torch.zeros(len(ids))
    return Rollout(
        "b",
        key,
        0,
        "p",
        "1",
        [0],
        list(ids),
        "",
        reward,
        "stop",
        "peer",
        s,
        s + torch.tensor(delta),
    )


def test_flip_rates() -> None:
    r = flip_rates([1, 1, 0, 0, 0], [0, 1, 1, 0, 0.5])
    assert r["flipR"] == pytest.approx(0.5) and r["flipW"] == pytest.approx(0.5)
    assert (r["n_right"], r["n_wrong"]) == (2, 3)
    empty = flip_rates([0.0], [1.0])
    assert math.isnan(empty["flipR"]) and empty["flipW"] == 1.0


def test_injection_positions_skip_the_final_eos() -> None:
    r = rollout([1, 2, 4, EOS], [0.1, -0.5, 0.3, 9.0], 1.0)
    pos = injection_positions(r, [EOS], seed=0)
    assert pos["max_delta"] == 2 and pos["min_delta"] == 1  # not the eos at 3
    assert 0 <= pos["random"] < 3
    assert injection_positions(r, [EOS], seed=0) == pos  # seeded
    no_teacher = Rollout("b", 0, 0, "p", "1", [0], [1, 2], "", 1.0)
    assert injection_positions(no_teacher, [EOS]) == {}


def test_explore_exploit_ranking_on_correct_rollouts() -> None:
    rs = [
        rollout([1, 2, 3, 1], [-1.0, 0.5, 0.0, -1.0], 1.0, key=0),  # correct
        rollout([4, 2, 5], [-3.0, 2.0, 0.0], 1.0, key=1),  # correct
        rollout([5, 5], [-9.0, -9.0], 0.0, key=2),  # incorrect: not counted
    ]
    out = explore_exploit_tokens(rs, Tok(), top=3, min_count=1)
    assert out["scope"] == "correct" and out["n_tokens"] == 7
    assert [e["token_id"] for e in out["explore"]] == [
        4,
        1,
        3,
    ]  # 3 and 5 tie at w = 1: lower id first
    assert out["explore"][0]["mean_w"] == pytest.approx(math.exp(3.0))
    assert out["explore"][1]["count"] == 2
    # token 2: deltas 0.5 and 2.0 -> mean w = (e^-0.5 + e^-2) / 2
    assert out["exploit"][0]["token_id"] == 2
    assert out["exploit"][0]["mean_w"] == pytest.approx((math.exp(-0.5) + math.exp(-2.0)) / 2)
    assert out["exploit"][0]["token"] == "␣b"
    assert out["exploit"][0]["mean_delta"] == pytest.approx(1.25)
    assert out["exploit"][0]["geo_mean_w"] == pytest.approx(math.exp(-1.25))
    occ = out["top_occurrences"]
    assert (occ[0]["rollout"], occ[0]["position"], occ[0]["w"]) == ("b/1/0", 0, math.exp(3.0))
    assert occ[1]["context"] == "" and occ[2]["context"] == "a b\n"
    # min_count drops the singletons when enough frequent types remain
    assert {e["token_id"] for e in explore_exploit_tokens(rs, Tok(), 1, 2)["explore"]} == {1}
    # no correct rollout: all rollouts, marked
    wrong = [rollout([5, 5], [-9.0, -9.0], 0.0)]
    assert explore_exploit_tokens(wrong, Tok(), 3, 1)["scope"] == "all"


def test_token_text_is_printable() -> None:
    assert token_text(Tok(), 3) == "\\n"
    assert token_text(Tok(), 7) == "âĢ"
