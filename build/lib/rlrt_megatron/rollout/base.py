"""The rollout engine protocol: what the trainer, eval and every engine agree on.

Engines: `local.py` (transformers, CPU, tests and demo) and `sglang/` (SGLang servers, GPU).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings for one generate call (SGLang names where they exist)."""

    n: int = 1  # completions per request (the group size G)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class GenerateRequest:
    """One prompt, already tokenized with the chat template."""

    prompt_token_ids: list[int]
    request_id: str = ""


@dataclass
class Completion:
    """One sampled completion of one request.

    `logprobs[t]` is the behavior policy's log-prob of `token_ids[t]` (the engine's weights at
    `weight_version`), used as `old_logprobs` when the trainer does not recompute them.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str  # "stop" | "length" | "abort"
    weight_version: int = 0
    meta: dict = field(default_factory=dict)


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(
        self, requests: list[GenerateRequest], sampling: SamplingParams
    ) -> list[list[Completion]]:
        """Return, for each request, `sampling.n` completions (in request order)."""
        ...

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Load new policy weights (Hugging Face names, full unsharded tensors) as `version`."""
        ...

    @property
    def weight_version(self) -> int: ...

    def health(self) -> bool: ...

    def shutdown(self) -> None: ...
