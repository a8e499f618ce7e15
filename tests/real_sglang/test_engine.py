"""SGLangEngine against ONE real SGLang server on the CPU (shared by the module): the server is
real (its /server_info and /model_info), /generate (n samples, stop strings, max tokens,
served log-probs == Megatron fp32 within 1e-4), partial rollouts (abort + continue across a
weight push), every weight-sync mode moving new weights in,
the API key, and (last: they restart the server) SIGKILL mid-/generate -> one restart, a
second crash -> RolloutServerCrashed."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from sglang_helpers import (
    PROBE_PROMPT,
    PROBE_RESPONSE,
    hf_tensors,
    launch_engine,
    make_models,
    max_abs_diff,
    megatron_logprobs,
)

from rlrt_megatron.rollout.base import GenerateRequest, SamplingParams
from rlrt_megatron.rollout.sglang import (
    TESTED_SGLANG,
    RolloutServerCrashed,
    SGLangClient,
    SGLangError,
)

pytestmark = pytest.mark.sglang

LOGPROB_TOL = 1e-4  # fp32 server vs fp32 Megatron, same tokens
PROMPTS = [[5, 17, 42, 99, 3], [250, 7, 64, 8, 301, 12, 77]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def probe_ref(models):
    """The trainer's (Megatron fp32) log-probs of the probe under each model's weights."""
    rows = [(PROBE_PROMPT, PROBE_RESPONSE)]
    return {name: megatron_logprobs(models[name], rows) for name in ("a", "b")}


@pytest.fixture(scope="module")
def engine(models, tmp_path_factory):
    eng = launch_engine(
        models["a"] / "hf",
        tmp_path_factory.mktemp("logs"),
        sync_dir=str(tmp_path_factory.mktemp("sync")),
        restart_cache=True,
    )
    yield eng
    eng.shutdown()


def test_the_server_is_a_real_sglang(engine):
    client = engine.servers[0].client
    info = client.request("GET", "/server_info")
    assert info["version"] == TESTED_SGLANG == client.version()
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    model = client.get_model_info()
    assert model["architectures"] == ["Qwen3ForCausalLM"]
    assert model["weight_version"] == "initial"  # our launch argument, before any sync
    assert engine.servers[0].proc is not None and engine.servers[0].alive()


def test_a_missing_endpoint_names_the_sglang_release(engine):
    with pytest.raises(SGLangError, match=r"SGLang 0\.5\.23 at .* has no /no_such_update endpoint"):
        engine.servers[0].client._update("/no_such_update", {})


def test_api_key_is_required(engine):
    url = engine.servers[0].url
    for key in (None, "wrong-key"):
        with pytest.raises(SGLangError) as err:
            SGLangClient(url, key).request("POST", "/generate", {"input_ids": [1, 2]})
        assert err.value.status == 401
    assert SGLangClient(url, engine.api_key).get_model_info()["model_type"] == "qwen3"


def test_generate_n_samples_and_max_tokens_with_logprobs_equal_to_megatron(engine, models):
    reqs = [GenerateRequest(p, f"r{i}") for i, p in enumerate(PROMPTS)]
    out = engine.generate(reqs, SamplingParams(n=3, max_new_tokens=10, seed=1))
    assert [len(group) for group in out] == [3, 3]
    for req, group in zip(reqs, out, strict=True):
        assert [c.meta["sample_index"] for c in group] == [0, 1, 2]
        for c in group:
            assert c.request_id == req.request_id and c.prompt_token_ids == req.prompt_token_ids
            assert 1 <= len(c.token_ids) <= 10 and len(c.logprobs) == len(c.token_ids)
            assert c.finish_reason == ("length" if len(c.token_ids) == 10 else "stop")
            assert c.weight_version == -1  # the launch weights ("initial")
    assert len({tuple(c.token_ids) for group in out for c in group}) > 1  # really sampled
    comps = [c for group in out for c in group]
    ref = megatron_logprobs(models["a"], [(c.prompt_token_ids, c.token_ids) for c in comps])
    assert max_abs_diff([c.logprobs for c in comps], ref) < LOGPROB_TOL


def test_stop_strings_end_the_completion(engine):
    req = [GenerateRequest(PROMPTS[1], "s")]
    greedy = engine.generate(req, SamplingParams(temperature=0.0, max_new_tokens=12))[0][0]
    assert len(greedy.token_ids) == 12 and greedy.finish_reason == "length"
    # a stop string: the first character that appears in the text only after its start
    text = greedy.text
    stop = next(ch for i, ch in enumerate(text) if i > 0 and text.find(ch) == i)
    got = engine.generate(req, SamplingParams(temperature=0.0, max_new_tokens=12, stop=(stop,)))
    c = got[0][0]
    assert c.finish_reason == "stop" and len(c.token_ids) < 12
    assert c.token_ids == greedy.token_ids[: len(c.token_ids)]  # the same greedy path, cut


def test_score_is_the_served_logprob_of_given_tokens(engine, probe_ref):
    if engine.weight_version != 0 or engine._synced:
        pytest.skip("runs before the sync tests (module order)")
    got = engine.score([PROBE_PROMPT], [PROBE_RESPONSE])
    assert max_abs_diff(got, probe_ref["a"]) < LOGPROB_TOL


def test_continue_rows_aborts_the_rest_and_resumes_exactly(engine, models):
    """Partial rollouts (`SGLangEngine.continue_rows`): group 0 needs one token to finish, the
    others up to 200; once group 0 is done the rest is aborted and comes back with the tokens
    and log-probs it has. After a push of the other weights the interrupted rows continue from
    prompt + those tokens: every served log-prob equals Megatron's under the weights that
    sampled it (the first segment: "a", the rest: "b"). Runs before the sync tests (which
    derive the weights they push from the version)."""
    budget, g0 = 200, [(7 * i) % 300 + 10 for i in range(199)]
    # the long groups first, so their requests reach the server first
    items = [(g, PROMPTS[g % 2], [], 5, g, j) for g in (1, 2) for j in range(2)]
    items += [(0, PROMPTS[0], g0, 5, 0, j) for j in range(2)]
    sampling = SamplingParams(n=2, max_new_tokens=budget, seed=5)
    first = engine.continue_rows(items, sampling, need=1)
    assert [len(t) for t, *_ in first[4:]] == [1, 1]  # group 0: one token each, finished
    assert all(reason in ("stop", "length") for _, _, reason, _ in first[4:])
    assert all(len(lp) == len(t) for t, lp, *_ in first)
    cut = [r for r, (t, _, reason, _) in enumerate(first) if reason is None]
    assert any(first[r][0] for r in cut), first  # interrupted with partial tokens
    assert all(len(first[r][0]) < budget for r in cut)
    group_of = [it[0] for it in items]
    complete = {g for g in (0, 1, 2) if all(first[r][2] for r in range(6) if group_of[r] == g)}
    assert 0 in complete and len(complete) < 3  # need=1: group 0, whole; not everything
    assert all(text == "" for *_, reason, text in first if reason is None) and first[4][3]
    version = engine.weight_version + 1
    engine.sync_mode = "disk"
    engine.update_weights(hf_tensors(models["b"]), version)
    again = [(g, p, list(t) + first[r][0], *rest) for r, (g, p, t, *rest) in enumerate(items)]
    again = [again[r] for r in cut]
    second = engine.continue_rows(again, sampling, need=len({it[0] for it in again}))
    assert all(reason in ("stop", "length") for _, _, reason, _ in second), second
    for it, (toks, _, reason, _) in zip(again, second, strict=True):
        total = len(it[2]) + len(toks)
        assert total <= budget and (reason == "stop" or total == budget)
    seg1 = [r for r in range(4) if first[r][0]]
    ref_a = megatron_logprobs(
        models["a"],
        [(items[r][1], first[r][0]) for r in seg1]
        + [(items[r][1] + items[r][2], first[r][0]) for r in (4, 5)],
    )
    rows_b = [(it[1] + it[2], t) for it, (t, *_) in zip(again, second, strict=True)]
    ref_b = megatron_logprobs(models["b"], rows_b)
    assert max_abs_diff([first[r][1] for r in [*seg1, 4, 5]], ref_a) < LOGPROB_TOL
    assert max_abs_diff([lp for _, lp, *_ in second], ref_b) < LOGPROB_TOL


PUSH_TIMES: dict[str, float] = {}


@pytest.mark.parametrize("mode", ["tensor", "distributed", "disk"])
def test_weight_sync_mode_moves_new_weights_in(engine, models, probe_ref, mode):
    """Each mode pushes the other model's weights as the next version: the server reports the
    version, samples carry it, and the served log-probs are the NEW weights' (Megatron's)."""
    version = engine.weight_version + 1
    new, old = ("b", "a") if version % 2 else ("a", "b")
    engine.sync_mode = mode
    stats = engine.update_weights(hf_tensors(models[new]), version)
    PUSH_TIMES[mode] = stats["seconds"]
    print(f"\nsglang push {mode}: {stats}")
    assert stats["bytes"] == sum(t.numel() * t.element_size() for _, t in hf_tensors(models[new]))
    assert engine.servers[0].client.get_weight_version() == str(version)
    got = engine.score([PROBE_PROMPT], [PROBE_RESPONSE])
    assert max_abs_diff(got, probe_ref[new]) < LOGPROB_TOL
    assert max_abs_diff(got, probe_ref[old]) > 1e-2  # the old weights are gone
    out = engine.generate([GenerateRequest(PROMPTS[0], "v")], SamplingParams(max_new_tokens=4))
    assert out[0][0].weight_version == version


def _process_group_of(engine) -> int:
    return os.getpgid(engine.servers[0].proc.pid)


def test_sigkill_mid_generate_restarts_once_and_the_batch_completes(engine):
    s = engine.servers[0]
    before = engine.restarts
    log_len = os.path.getsize(s.log_path)
    pgid = _process_group_of(engine)

    def kill_when_decoding():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            with open(s.log_path, errors="replace") as f:
                f.seek(log_len)
                if "Prefill batch" in f.read():
                    os.killpg(pgid, signal.SIGKILL)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_decoding)
    killer.start()
    reqs = [GenerateRequest(p, f"k{i}") for i, p in enumerate(PROMPTS)]
    out = engine.generate(reqs, SamplingParams(n=4, max_new_tokens=200, seed=3))
    killer.join()
    assert engine.restarts == before + 1
    assert _process_group_of(engine) != pgid  # a new server process
    assert [len(g) for g in out] == [4, 4]
    # the restarted server got the last synced weights back (restart_cache)
    assert s.client.get_weight_version() == str(engine.weight_version)
    assert all(c.weight_version == engine.weight_version for g in out for c in g)


def test_a_second_crash_fails_the_step_clearly(engine):
    orig = engine.restart

    def restart_then_crash(server):
        orig(server)
        os.killpg(os.getpgid(server.proc.pid), signal.SIGKILL)  # dies again right away
        server.proc.wait(30)

    engine.restart = restart_then_crash
    try:
        os.killpg(_process_group_of(engine), signal.SIGKILL)
        engine.servers[0].proc.wait(30)
        with pytest.raises(RolloutServerCrashed, match="failed again after one restart"):
            engine.generate([GenerateRequest(PROMPTS[0], "c")], SamplingParams(max_new_tokens=4))
    finally:
        engine.restart = orig
