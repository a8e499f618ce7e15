"""Partial rollouts on SGLang servers: abort + continue (`SGLangEngine.continue_rows`, the SGLang
side of `rlrt_megatron/rollout/partial.py`, whose `run_round` calls it).

Each unfinished rollout is one /generate: input_ids = prompt + its tokens so far,
max_new_tokens = the budget left (`rollout.max_new_tokens` - tokens so far), return_logprob, the
sampling params `generate` sends and the rollout's own `sampling_seed` (SGLang hashes it with the
token's position, so a continued rollout draws what it would have uninterrupted, where the server
honours seeds). The prefix is re-encoded under the weights the server holds now. Rows are spread
over the servers in contiguous balanced shards as `generate` does, at most `MAX_INFLIGHT`
requests in flight per server (one thread each: urllib blocks). As answers come back, the groups
whose rows have all finished are counted; once `need` groups are complete every server gets
`POST /abort_request {"abort_all": true}` (repeated every `ABORT_RETRY_S` while answers are
outstanding: a request sent just after an abort would run to its end), and rows not sent yet
are not sent (interrupted with no new tokens).

What an aborted request returns (SGLang 0.5.23, checked on the real CPU server,
tests/real_sglang/test_engine.py::test_continue_rows_aborts_the_rest_and_resumes_exactly; source:
srt/managers/scheduler.py `abort_request`, tokenizer_manager.py `_handle_abort_req`): the
/abort_request call answers 200 at once and the abort happens asynchronously; each aborted
/generate then answers HTTP 200 with `meta_info.finish_reason = {"type": "abort", "message":
"Aborted", "status_code": null, ...}`, `output_ids` = the tokens sampled up to the abort (a running
request runs one more decode pass after the abort is received; its token is included) and
`meta_info.output_token_logprobs` their log-probs, as many and for the same tokens (and
`weight_version`, `completion_tokens`); a request still in the waiting queue comes back with no
tokens. The served log-probs of tokens returned by an aborted request equal the trainer's
(Megatron fp32) like those of a finished one. `abort_all` aborts every request on the server:
the engine's rollout thread is its only client during a round.

The abort wins over the finish checks of that last pass (`Req.update_finish_state` looks at
`to_finish` first), so an aborted row whose last token is a stop token, or that used up its
budget, has in fact finished: `finish_of` reads it as "stop" / "length", never as interrupted
(the stop tokens: the tokenizer's EOS and the `eos_token_id`s of config.json and
generation_config.json, as SGLang's). The text of a finished rollout is its whole response
decoded with the tokenizer of `engine.model_path` (skip_special_tokens, as SGLang's detokenizer
and `LocalEngine` do): the server's text covers only the last segment.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from rlrt_megatron.rollout.base import GenerateRequest, SamplingParams
from rlrt_megatron.rollout.sglang.client import (
    Sample,
    SGLangConnectionError,
    SGLangError,
    parse_generate_output,
    sample_seed,
    sampling_to_sglang,
)
from rlrt_megatron.rollout.sglang.server import spread
from rlrt_megatron.rollout.weight_sync import WeightSyncError

__all__ = ["ABORT_RETRY_S", "MAX_INFLIGHT", "continue_rows", "finish_of", "text_tools"]

MAX_INFLIGHT = 128  # /generate requests in flight per server (threads)
ABORT_RETRY_S = 0.5  # re-abort this often while aborted requests are outstanding

Row = tuple[list[int], list[float], str | None, str]


def _ids(v: Any) -> set[int]:
    if v is None:
        return set()
    return {int(x) for x in v} if isinstance(v, (list, tuple)) else {int(v)}


def text_tools(engine: Any) -> tuple[Any, set[int]]:
    """(tokenizer, stop token ids) of `engine.model_path`, loaded once per engine."""
    if engine.text_tools is None:
        from transformers import AutoTokenizer

        path = engine.model_path
        if not path or not os.path.isdir(path):
            raise SGLangError(
                f"partial rollouts on SGLang decode the responses with the model's tokenizer; "
                f"the engine's model path {path!r} is not a directory (pass the HF model dir "
                "to SGLangEngine / SGLangEngine.connect)"
            )
        tok = AutoTokenizer.from_pretrained(path)
        stop = _ids(tok.eos_token_id)
        for name in ("config.json", "generation_config.json"):
            f = os.path.join(path, name)
            if os.path.isfile(f):
                with open(f) as fh:
                    stop |= _ids(json.load(fh).get("eos_token_id"))
        engine.text_tools = (tok, stop)
    return engine.text_tools


def finish_of(reason: str, tokens: list[int], budget: int, stop_ids: set[int]) -> str | None:
    """The finish reason of one continued row: SGLang's, except that an aborted row ended by a
    stop token or its budget has finished (module docstring); None = interrupted."""
    if reason != "abort":
        return reason
    if tokens and tokens[-1] in stop_ids:
        return "stop"
    return "length" if len(tokens) >= budget else None


def _payload(item: tuple, sampling: SamplingParams, budget: int, rid: str) -> dict:
    _, prompt, tokens, seed, request, sample = item
    params = {**sampling_to_sglang(sampling), "max_new_tokens": budget}
    if sampling.seed is not None:
        params["sampling_seed"] = sample_seed(seed, request, sample)
    return {
        "input_ids": list(prompt) + list(tokens),
        "sampling_params": params,
        "rid": rid,
        "return_logprob": True,
        "logprob_start_len": -1,  # log-probs of the generated tokens only
        "stream": False,
    }


def continue_rows(
    engine: Any,
    items: list[tuple],
    sampling: SamplingParams,
    need: int,
    max_inflight: int = MAX_INFLIGHT,
) -> list[Row]:
    """`rlrt_megatron.rollout.partial.continue_rows` on `engine`'s servers (module docstring).

    `items[i]` = (group id, prompt ids, tokens so far, seed, request, sample). Returns per item
    (new tokens, their log-probs, finish reason or None if interrupted, text of the whole response
    once finished)."""
    if sampling.stop:
        raise ValueError(
            "partial rollouts on SGLang: stop strings are not supported (a string may straddle "
            "an abort); the trainer sends none"
        )
    tok, stop_ids = text_tools(engine)
    budget = [sampling.max_new_tokens - len(t) for _, _, t, *_ in items]
    groups = [g for g, *_ in items]
    left = {g: groups.count(g) for g in groups}  # unfinished rows per group
    out: list[Row] = [([], [], None, "") for _ in items]
    complete = 0
    for r, b in enumerate(budget):  # nothing left to sample: finished at its length
        if b <= 0:
            out[r] = ([], [], "length", tok.decode(list(items[r][2]), skip_special_tokens=True))
            left[groups[r]] -= 1
            complete += left[groups[r]] == 0
    stop = threading.Event()
    expected = engine.weight_version if engine._synced else -1
    tag = f"continue-{time.monotonic_ns()}"
    todo = [r for r, b in enumerate(budget) if b > 0]
    shards = spread(engine.servers, todo)

    def one(server: Any, r: int) -> tuple[int, dict | None]:
        rid = f"{tag}/{r}"
        payload = _payload(items[r], sampling, budget[r], rid)

        def call() -> dict | None:
            return None if stop.is_set() else server.client.generate(payload)[0]

        return r, engine._call_with_restart(server, call)

    def take(r: int, ans: dict | None) -> bool:
        """Record row r's answer; True when it completes its group."""
        if ans is None:  # not sent: the abort came first
            return False
        meta = ans.get("meta_info") or {}
        fr = meta.get("finish_reason")
        aborted = isinstance(fr, dict) and fr.get("type") == "abort"
        if aborted and not meta.get("output_token_logprobs"):
            return False  # aborted in the waiting queue: no tokens
        _, prompt, tokens, _, _, smp = items[r]
        req = GenerateRequest(list(prompt) + list(tokens), request_id=str(r))
        c = parse_generate_output(ans, req, Sample(0, smp, f"{tag}/{r}"))
        if c.weight_version != expected:
            raise WeightSyncError(
                f"continue_rows: a server answered with weights version {c.weight_version} "
                f"while the engine pushed {expected} (-1 = the launch weights)"
            )
        reason = finish_of(c.finish_reason, c.token_ids, budget[r], stop_ids)
        text = "" if reason is None else tok.decode(
            list(tokens) + c.token_ids, skip_special_tokens=True
        )  # fmt: skip
        out[r] = (c.token_ids, c.logprobs, reason, text)
        if reason is None:
            return False
        left[groups[r]] -= 1
        return left[groups[r]] == 0

    def abort() -> None:
        for s, _ in shards:
            try:
                s.client.abort_all()
            except SGLangConnectionError:
                pass  # its rows fail over to the restart policy, and are then not resent

    pools = [
        ThreadPoolExecutor(min(len(rows), max_inflight), thread_name_prefix=f"sglang{s.index}")
        for s, rows in shards
    ]
    pending: set[Future] = set()
    try:
        if complete >= need:
            stop.set()
        for (s, rows), pool in zip(shards, pools, strict=True):
            pending |= {pool.submit(one, s, r) for r in rows}
        last_abort = 0.0
        while pending:
            done, pending = wait(
                pending, timeout=ABORT_RETRY_S if stop.is_set() else None,
                return_when=FIRST_COMPLETED,
            )  # fmt: skip
            for fut in done:
                complete += take(*fut.result())
            if pending and complete >= need:
                if not stop.is_set() or time.monotonic() - last_abort >= ABORT_RETRY_S:
                    stop.set()
                    abort()
                    last_abort = time.monotonic()
    except BaseException:
        stop.set()
        for fut in pending:
            fut.cancel()
        try:
            abort()
        except SGLangError:
            pass
        raise
    finally:
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)
    return out
