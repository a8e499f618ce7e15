"""The local engine in its own process, so that generation runs while the trainer trains.

`ProcessEngine` is a `RolloutEngine` whose `LocalEngine` lives in a child process (spawn start
method: no fork of a process holding CUDA, gloo or Megatron state). The trainer's
asynchronous rollouts (`rollout.max_staleness >= 1`) use it because the local engine in the
trainer's process would hold the GIL and the same CPU threads as the trainer; on a GPU the child
gets its own CUDA context on the same device.

Protocol: one request, one answer, over a pipe, one at a time (a lock makes each round trip
atomic, so a background thread may generate while the main thread waits to push weights; the
second simply queues). Requests: `generate(requests, sampling)`, `update_weights(named_tensors,
version)`, `score(prompts, responses, temperature)` (the engine's log-probs of given tokens, for
the trainer's sync check) and `shutdown`.

Failure modes and what the caller sees:
- an exception in the child (bad request, out of memory) comes back as `RolloutProcessError`
  carrying the child's traceback; the child keeps serving;
- the child dies (killed, segfault): the next call raises `RolloutProcessError` with its exit
  code; the engine is then unusable (`health()` is False);
- `shutdown()` terminates the child if it does not exit within a few seconds, so a preempted
  trainer never waits for an in-flight generation.

Weights cross as CPU tensors in shared memory (torch.multiprocessing): one host copy of the
model per sync, fine for the small models the local engine is for (SGLang covers large ones).
"""

from __future__ import annotations

import contextlib
import os
import threading
import traceback
from collections.abc import Iterable
from typing import Any

import torch

from rlrt_megatron.rollout.base import Completion, GenerateRequest, SamplingParams


class RolloutProcessError(RuntimeError):
    """The rollout process failed a request or died."""


class ProcessEngine:
    """`RolloutEngine` proxy of a `LocalEngine(**engine_kwargs)` running in a child process.

    Args:
        engine_kwargs: `LocalEngine` arguments (a model directory, not a model object; `device`
            and `dtype` may be strings or torch objects).
        num_threads: torch CPU threads of the child (default: `OMP_NUM_THREADS` or 1).
        start_timeout: seconds to wait for the child to load the model.
    """

    def __init__(
        self, *, num_threads: int | None = None, start_timeout: float = 600.0, **engine_kwargs: Any
    ) -> None:
        import torch.multiprocessing as tmp

        if isinstance(engine_kwargs.get("model_dir_or_model"), torch.nn.Module):
            raise ValueError("ProcessEngine: pass the model directory, not a model object")
        for k in ("device", "dtype"):
            if k in engine_kwargs and not isinstance(engine_kwargs[k], str):
                engine_kwargs[k] = str(engine_kwargs[k]).removeprefix("torch.")
        threads = num_threads or int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
        ctx = tmp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_serve, args=(child, engine_kwargs, threads), daemon=True, name="rollout"
        )
        self._proc.start()
        child.close()
        self._lock = threading.Lock()
        self._version = 0
        self._alive = True
        if not self._conn.poll(start_timeout):
            self.shutdown()
            raise RolloutProcessError(
                f"ProcessEngine: the rollout process did not start within {start_timeout:.0f}s"
            )
        self._version = int(self._recv("start"))

    # ------------------------------------------------------------------ protocol
    @property
    def weight_version(self) -> int:
        return self._version

    def health(self) -> bool:
        return self._alive and self._proc.is_alive()

    def generate(
        self, requests: list[GenerateRequest], sampling: SamplingParams
    ) -> list[list[Completion]]:
        return self._call("generate", list(requests), sampling)

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Copy every tensor to shared CPU memory (never the caller's own storage: sending moves a
        CPU tensor's storage into shared memory) and load them all in the child."""
        tensors = [(n, t.detach().to("cpu", copy=True)) for n, t in named_tensors]
        self._call("update_weights", tensors, int(version))
        self._version = int(version)

    def score(
        self,
        prompts: list[list[int]],
        responses: list[list[int]],
        temperature: float = 1.0,
        routed: list | None = None,
    ) -> list[list[float]]:
        """The engine's log-probs of `responses[i]` after `prompts[i]` (teacher-forced), with the
        same convention as its sampling: log_softmax(logits / temperature) over the true
        vocabulary; MoE routers replaying `routed[i]` when given (`score_tokens`)."""
        return self._call("score", prompts, responses, float(temperature), routed)

    def continue_rows(self, items: list[tuple], sampling: SamplingParams, need: int) -> list:
        """`rollout/partial.continue_rows` in the rollout process (partial rollouts)."""
        return self._call("continue_rows", items, sampling, int(need))

    def state_dict(self) -> dict:
        return self._call("state_dict")

    def load_state_dict(self, state: dict) -> None:
        self._call("load_state_dict", state)

    def shutdown(self) -> None:
        if not self._alive:
            return
        self._alive = False
        try:
            if self._proc.is_alive() and self._lock.acquire(timeout=1.0):
                try:
                    self._conn.send(("shutdown",))
                finally:
                    self._lock.release()
        except (OSError, EOFError):
            pass
        self._proc.join(timeout=5.0)
        if self._proc.is_alive():  # busy generating: do not wait for it
            self._proc.terminate()
            self._proc.join(timeout=5.0)
        self._conn.close()

    # ------------------------------------------------------------------ internals
    def _call(self, op: str, *args: Any) -> Any:
        if not self._alive:
            raise RolloutProcessError(f"ProcessEngine.{op}: used after shutdown()")
        with self._lock:
            try:
                self._conn.send((op, *args))
            except (OSError, EOFError) as e:
                raise self._died(op) from e
            return self._recv(op)

    def _recv(self, op: str) -> Any:
        try:
            status, value = self._conn.recv()
        except (OSError, EOFError) as e:
            raise self._died(op) from e
        if status == "error":
            raise RolloutProcessError(f"ProcessEngine.{op} failed in the rollout process:\n{value}")
        return value

    def _died(self, op: str) -> RolloutProcessError:
        self._alive = False
        self._proc.join(timeout=5.0)
        return RolloutProcessError(
            f"ProcessEngine.{op}: the rollout process died (exit code {self._proc.exitcode}); "
            "see its stderr above"
        )


def score_tokens(
    engine: Any,
    prompts: list[list[int]],
    responses: list[list[int]],
    temperature: float = 1.0,
    routed: list | None = None,
) -> list[list[float]]:
    """`LocalEngine`'s log-probs of given responses (one padded forward per chunk of rows).
    `routed[i]`: the experts `[tokens, moe_layers, k]` its MoE layers use for row i's first
    tokens (routing replay: the trainer's recompute replays the same ones, so that the sync
    check compares weights, not routing)."""
    from rlrt_megatron.rollout.moe_routing import ReplayedExperts

    out: list[list[float]] = []
    model, dev = engine.model, engine.device
    step = max(1, engine.max_batch_rows)
    for lo in range(0, len(prompts), step):
        ps, rs = prompts[lo : lo + step], responses[lo : lo + step]
        seqs = [list(p) + list(r) for p, r in zip(ps, rs, strict=True)]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), engine.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):  # right-padded: positions count from 0 in every row
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        replay = None if routed is None else ReplayedExperts(model, routed[lo : lo + step], width)
        with torch.no_grad(), replay or contextlib.nullcontext():
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
        if logits.shape[-1] > engine.vocab_size:
            logits[..., engine.vocab_size :] = float("-inf")
        if temperature > 0:
            logits = logits / temperature
        logp = torch.log_softmax(logits, dim=-1)
        for i, (p, r) in enumerate(zip(ps, rs, strict=True)):
            if not r:
                out.append([])
                continue
            pos = torch.arange(len(p) - 1, len(p) + len(r) - 1, device=logp.device)
            tgt = torch.tensor(r, dtype=torch.long, device=logp.device)
            out.append(logp[i, pos, tgt].tolist())
    return out


def _serve(conn: Any, engine_kwargs: dict, threads: int) -> None:
    """The child: build the engine, then answer requests until `shutdown` or the pipe closes."""
    torch.set_num_threads(max(1, threads))
    try:
        from rlrt_megatron.rollout.local import LocalEngine

        kw = dict(engine_kwargs)
        if isinstance(kw.get("dtype"), str):
            kw["dtype"] = getattr(torch, kw["dtype"])
        engine = LocalEngine(**kw)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", engine.weight_version))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        op, args = msg[0], msg[1:]
        if op == "shutdown":
            engine.shutdown()
            return
        try:
            if op == "generate":
                value = engine.generate(*args)
            elif op == "update_weights":
                tensors, version = args
                engine.update_weights(tensors, version)
                del tensors
                value = None
            elif op == "continue_rows":
                from rlrt_megatron.rollout.partial import continue_rows

                value = continue_rows(engine, *args)
            elif op == "score":
                value = score_tokens(engine, *args)
            elif op == "state_dict":
                value = engine.state_dict()
            elif op == "load_state_dict":
                value = engine.load_state_dict(*args)
            else:
                raise ValueError(f"unknown request {op!r}")
        except Exception:
            conn.send(("error", traceback.format_exc()))
            continue
        conn.send(("ok", value))


__all__ = ["ProcessEngine", "RolloutProcessError", "score_tokens"]
