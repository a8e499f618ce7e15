"""Partial rollouts on SGLang (`rollout/sglang/partial.py`): what a real server cannot be made to
show on demand. The abort + continue path itself runs against a real SGLang server in
tests/real_sglang (test_engine.py, test_train.py)."""

from __future__ import annotations

import threading

from recipes import get_recipe
from rlrt_megatron.rollout.sglang import SGLangConnectionError, SGLangEngine
from rlrt_megatron.rollout.sglang.partial import finish_of
from rlrt_megatron.rollout.sglang.server import Server


def test_an_aborted_row_ended_by_a_stop_token_or_its_budget_has_finished():
    # SGLang 0.5.23 reports "abort" for the token decoded in the pass that received the abort,
    # even when that token is EOS or the last of the budget (Req.update_finish_state)
    eos = {2, 7}
    assert finish_of("abort", [5, 9, 7], budget=10, stop_ids=eos) == "stop"
    assert finish_of("abort", [5, 9, 4], budget=3, stop_ids=eos) == "length"
    assert finish_of("abort", [5, 9, 4], budget=4, stop_ids=eos) is None  # interrupted
    assert finish_of("abort", [], budget=4, stop_ids=eos) is None  # aborted while queued
    assert finish_of("stop", [5, 2], budget=4, stop_ids=eos) == "stop"
    assert finish_of("length", [5, 9], budget=2, stop_ids=eos) == "length"


def test_concurrent_calls_on_a_crashed_server_restart_it_once():
    """continue_rows sends one /generate per row: every row of a crashed server fails; the
    server must be restarted once, not once per row."""
    eng = object.__new__(SGLangEngine)
    eng._lock = threading.Lock()
    server = Server(index=0, url="http://127.0.0.1:1", cmd=["x"], tp=1)
    restarts = []

    def restart(s):
        restarts.append(s.index)
        s.starts += 1

    eng.restart = restart
    both_failed = threading.Barrier(2)
    results = []

    def call():
        state = {"tries": 0}

        def fn():
            state["tries"] += 1
            if state["tries"] == 1:
                both_failed.wait(10)  # both calls saw the crash before either restarts
                raise SGLangConnectionError("connection refused")
            return "ok"

        results.append(eng._call_with_restart(server, fn))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == ["ok", "ok"] and restarts == [0]


def test_partial_rollouts_are_allowed_on_sglang():
    cfg = get_recipe(
        "tiny_demo",
        [
            "rollout.engine=sglang",
            "rollout.sglang_colocated=false",
            "rollout.max_staleness=2",
            "rollout.partial=true",
        ],
    )
    assert cfg.rollout.partial and cfg.rollout.engine == "sglang"
