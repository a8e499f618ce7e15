"""The HTTP side of one SGLang server: errors, the JSON client, and the /generate mapping.

What we call (SGLang's native HTTP API, python/sglang/srt/entrypoints/http_server.py) is listed
in the package docstring (`rlrt_megatron.rollout.sglang`). Failure modes the caller sees:
an HTTP error status -> SGLangError (with the server's answer); no answer at all (refused,
reset, timeout) -> SGLangConnectionError, which the engine's restart policy acts on; an update
endpoint answering {"success": false} -> WeightSyncError; a /generate answer whose token ids and
log-probs do not line up -> SGLangError.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from http.client import HTTPException

from rlrt_megatron.rollout.base import Completion, GenerateRequest, SamplingParams
from rlrt_megatron.rollout.weight_sync import WeightSyncError

__all__ = [
    "build_generate_payload",
    "build_score_payload",
    "expand_samples",
    "GPU_EXTRA_HINT",
    "INITIAL_WEIGHT_VERSION",
    "parse_generate_output",
    "parse_score_output",
    "require_sglang",
    "RolloutServerCrashed",
    "Sample",
    "sampling_to_sglang",
    "TESTED_SGLANG",
    "sglang_available",
    "SGLangClient",
    "SGLangConnectionError",
    "SGLangError",
    "sample_seed",
]

# The SGLang release the `sglang` test tier runs (make sglang-env) and the README names.
TESTED_SGLANG = "0.5.23"

GPU_EXTRA_HINT = "install the GPU extra on a CUDA machine: pip install -e '.[gpu]'"


class SGLangError(RuntimeError):
    """The SGLang server answered with an error, or could not be reached. `status`: the HTTP
    status of an error answer (None when there was no answer); `answer`: its JSON body."""

    def __init__(self, message: str, status: int | None = None, answer: object = None):
        super().__init__(message)
        self.status = status
        self.answer = answer


class SGLangConnectionError(SGLangError):
    """No HTTP answer: the server is down, crashed mid-request or timed out."""


class RolloutServerCrashed(SGLangError):
    """A server crashed, was restarted once, and failed again (the step must fail)."""


def sglang_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("sglang") is not None


def require_sglang(feature: str = "rollout.engine=sglang") -> None:
    if not sglang_available():
        from rlrt_megatron.megatron.te import MissingGPUExtraError

        raise MissingGPUExtraError(
            f"{feature} needs the `sglang` package, which is not installed here; "
            f"{GPU_EXTRA_HINT} (or use rollout.engine=local, the transformers engine for CPU)."
        )


# ----------------------------------------------------------------------------- HTTP client


class SGLangClient:
    """A thin JSON-over-HTTP client for one SGLang server (stdlib urllib, no extra deps)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 3600.0):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._version: str | None = None  # the server's SGLang release, read once
        self._version_path: str | None = None  # where this server reports its weight version
        self._sessions: bool | None = None  # begin/end_weight_update exist (SGLang >= 0.5.2x)

    def request(self, method: str, path: str, payload=None, timeout: float | None = None):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:2000]
            try:
                answer = json.loads(detail)
            except json.JSONDecodeError:
                answer = None
            raise SGLangError(
                f"SGLang {method} {self.base_url}{path} -> HTTP {e.code}: {detail}", e.code, answer
            ) from None
        except (urllib.error.URLError, HTTPException, ConnectionError, TimeoutError, OSError) as e:
            raise SGLangConnectionError(
                f"SGLang {method} {self.base_url}{path}: no answer ({type(e).__name__}: {e})"
            ) from e
        if not body:
            return None
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            return body.decode(errors="replace")

    def _update(self, path: str, payload: dict, timeout: float | None = None) -> dict:
        try:
            out = self.request("POST", path, payload, timeout)
        except SGLangError as e:
            if e.status == 404:
                raise self.missing(path) from None
            if isinstance(e.answer, dict) and e.answer.get("success") is False:
                # SGLang 0.5.x answers a failed update with HTTP 400 {"success": false, ...}
                raise WeightSyncError(
                    f"SGLang {self.version()} {path} at {self.base_url} failed: "
                    f"{e.answer.get('message')}"
                ) from None
            raise
        if isinstance(out, dict) and out.get("success") is False:
            raise WeightSyncError(
                f"SGLang {self.version()} {path} at {self.base_url} failed: {out.get('message')}"
            )
        return out

    def missing(self, path: str) -> SGLangError:
        """The error for an endpoint this server does not have (HTTP 404), naming its release."""
        return SGLangError(
            f"SGLang {self.version()} at {self.base_url} has no {path} endpoint (HTTP 404); "
            f"this client speaks SGLang {TESTED_SGLANG} (tested) and the releases listed in "
            "the README's SGLang section: install one of those (make sglang-env builds the "
            "tested one), or pick another rollout.sglang_sync_mode",
            404,
        )

    def version(self) -> str:
        """The server's SGLang release (`/server_info` "version"; "unknown" if not reported)."""
        if self._version is None:
            self._version = "unknown"
            for path in ("/server_info", "/get_server_info"):
                try:
                    out = self.request("GET", path, timeout=30.0)
                except SGLangError:
                    continue
                if isinstance(out, dict) and out.get("version"):
                    self._version = str(out["version"])
                    break
        return self._version

    # -- status
    def health(self, timeout: float = 10.0) -> bool:
        try:
            self.request("GET", "/health", timeout=timeout)
            return True
        except SGLangError:
            return False

    def get_model_info(self) -> dict:
        """/model_info (SGLang >= 0.5.2x; /get_model_info before, now deprecated)."""
        try:
            return self.request("GET", "/model_info")
        except SGLangError as e:
            if e.status != 404:
                raise
        return self.request("GET", "/get_model_info")

    def get_weight_version(self) -> str:
        """The version of the weights the server runs: `/get_weight_version` (some releases),
        else the "weight_version" of /model_info or /get_model_info (0.5.23). The endpoint
        that answered is remembered."""
        paths = [self._version_path] if self._version_path else [
            "/get_weight_version", "/model_info", "/get_model_info"
        ]  # fmt: skip
        for path in paths:
            try:
                out = self.request("GET", path)
            except SGLangError as e:
                if e.status == 404:
                    continue
                raise
            if isinstance(out, dict) and "weight_version" in out:
                self._version_path = path
                return str(out["weight_version"])
        raise self.missing("/get_weight_version (nor a weight_version in /model_info)")

    # -- generation
    def generate(self, payload: dict) -> list[dict]:
        out = self.request("POST", "/generate", payload)
        return out if isinstance(out, list) else [out]

    def flush_cache(self) -> None:
        self.request("POST", "/flush_cache")

    def abort_all(self) -> None:
        """Abort every request the server runs or queues (`/abort_request {"abort_all": true}`,
        SGLang 0.5.23; asynchronous: the requests return shortly after, each with
        finish_reason {"type": "abort"} and the tokens it has; see sglang/partial.py)."""
        self.request("POST", "/abort_request", {"abort_all": True}, timeout=60.0)

    # -- weights
    def begin_weight_update(self) -> bool:
        """Open a weight-update session (SGLang >= 0.5.2x refuses tensor and distributed pushes
        outside one). False when the server has no sessions (older releases: pushes need none)."""
        if self._sessions is False:
            return False
        try:
            self._update("/begin_weight_update", {})
        except SGLangError as e:
            if e.status != 404:
                raise
            self._sessions = False
            return False
        self._sessions = True
        return True

    def end_weight_update(self) -> None:
        self._update("/end_weight_update", {})

    def update_weights_from_tensor(
        self,
        serialized: Sequence[str],
        load_format: str | None,
        weight_version: str | None,
        flush_cache: bool = True,
    ) -> dict:
        payload = {
            "serialized_named_tensors": list(serialized),
            "load_format": load_format,
            "flush_cache": flush_cache,
        }
        if weight_version is not None:
            payload["weight_version"] = weight_version
        return self._update("/update_weights_from_tensor", payload)

    def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str = "nccl",
    ) -> dict:
        return self._update(
            "/init_weights_update_group",
            {
                "master_address": master_address,
                "master_port": master_port,
                "rank_offset": rank_offset,
                "world_size": world_size,
                "group_name": group_name,
                "backend": backend,
            },
        )

    def destroy_weights_update_group(self, group_name: str) -> dict:
        return self._update("/destroy_weights_update_group", {"group_name": group_name})

    def update_weights_from_distributed(
        self, spec: dict, group_name: str, weight_version: str | None, flush_cache: bool = True
    ) -> dict:
        payload = {**spec, "group_name": group_name, "flush_cache": flush_cache}
        if weight_version is not None:
            payload["weight_version"] = weight_version
        return self._update("/update_weights_from_distributed", payload)

    def update_weights_from_disk(self, model_path: str, weight_version: str | None) -> dict:
        payload = {"model_path": model_path}
        if weight_version is not None:
            payload["weight_version"] = weight_version
        return self._update("/update_weights_from_disk", payload)

    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        self.request("POST", "/release_memory_occupation", {"tags": tags})

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        self.request("POST", "/resume_memory_occupation", {"tags": tags})

    def get_weights_by_name(self, name: str, truncate_size: int):
        return self.request(
            "POST", "/get_weights_by_name", {"name": name, "truncate_size": truncate_size}
        )


# ----------------------------------------------------------------------------- request mapping


def sampling_to_sglang(sampling: SamplingParams) -> dict:
    """Our SamplingParams -> SGLang `sampling_params` for ONE sample (n is expanded by us)."""
    params = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "max_new_tokens": sampling.max_new_tokens,
    }
    if sampling.stop:
        params["stop"] = list(sampling.stop)
    return params


@dataclass(frozen=True)
class Sample:
    request_index: int
    sample_index: int
    rid: str


def expand_samples(requests: Sequence[GenerateRequest], n: int) -> list[Sample]:
    """One entry per completion, request-major. rid = "<request_id>/<j>" (unique per call)."""
    out = []
    for i, req in enumerate(requests):
        base = req.request_id or f"req{i}"
        out.extend(Sample(i, j, f"{base}/{j}") for j in range(n))
    if len({s.rid for s in out}) != len(out):
        raise ValueError("generate: request_ids must be unique within one call")
    return out


def sample_seed(seed: int, request_index: int, sample_index: int) -> int:
    """SGLang's `sampling_seed` of one sample (position-hashed by the server: a rollout continued
    from its partial tokens with the same seed draws what it would have drawn uninterrupted)."""
    return seed + request_index * 100003 + sample_index


def build_generate_payload(
    requests: Sequence[GenerateRequest],
    samples: Sequence[Sample],
    sampling: SamplingParams,
    routed_experts: bool = False,
) -> dict:
    """A batched /generate body: each sample is its own row (SGLang shares the prompt prefix
    through its radix cache, so repeating the prompt n times costs no extra prefill).
    `routed_experts`: ask for each token's MoE experts (servers launched with
    `--enable-return-routed-experts`)."""
    params = sampling_to_sglang(sampling)
    # per-sample seeds (SGLang's `sampling_seed`; honoured with --enable-deterministic-inference)
    per_sample = []
    for s in samples:
        p = dict(params)
        if sampling.seed is not None:
            p["sampling_seed"] = sample_seed(sampling.seed, s.request_index, s.sample_index)
        per_sample.append(p)
    return {
        "input_ids": [list(requests[s.request_index].prompt_token_ids) for s in samples],
        "sampling_params": per_sample,
        "rid": [s.rid for s in samples],
        "return_logprob": True,
        "logprob_start_len": -1,  # log-probs of the generated tokens only
        "stream": False,
        **({"return_routed_experts": True} if routed_experts else {}),
    }


def build_score_payload(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]
) -> dict:
    """A /generate body that samples nothing and returns the log-probs of each row's response
    tokens given its prompt (`input_token_logprobs` from the prompt's last token on)."""
    return {
        "input_ids": [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)],
        "sampling_params": [{"max_new_tokens": 0, "temperature": 1.0} for _ in prompts],
        "return_logprob": True,
        # SGLang reports no log-prob (None) for the token at the start position itself
        "logprob_start_len": [len(p) - 1 for p in prompts],
        "stream": False,
    }


def parse_score_output(out: dict, prompt_len: int, response_len: int) -> list[float]:
    """The response tokens' log-probs from one /generate answer of `build_score_payload`."""
    lp = (out.get("meta_info") or {}).get("input_token_logprobs")
    if lp is None or len(lp) < response_len:
        raise SGLangError(
            f"score: expected {response_len} input_token_logprobs after a {prompt_len}-token "
            f"prompt, got {None if lp is None else len(lp)}"
        )
    return [float(item[0]) for item in lp[len(lp) - response_len :]]


INITIAL_WEIGHT_VERSION = "initial"  # what a server reports before its first sync


def _parse_version(v, default: int) -> int:
    """SGLang's string version -> int; the initial weights ("initial"/"default") -> `default`."""
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


def parse_generate_output(out: dict, request: GenerateRequest, sample: Sample) -> Completion:
    """One /generate result -> Completion; checks token ids and log-probs line up.

    `weight_version` is the server's version when it finished the sample, -1 for the weights
    it was launched with (never synced)."""
    meta = out.get("meta_info") or {}
    lp = meta.get("output_token_logprobs")
    if lp is None:
        raise SGLangError(f"generate {sample.rid}: no meta_info.output_token_logprobs in answer")
    logprobs = [float(item[0]) for item in lp]
    token_ids = [int(item[1]) for item in lp]
    if out.get("output_ids") is not None and list(out["output_ids"]) != token_ids:
        raise SGLangError(
            f"generate {sample.rid}: output_ids ({len(out['output_ids'])}) and "
            f"output_token_logprobs ({len(token_ids)}) disagree"
        )
    fr = meta.get("finish_reason")
    finish = fr.get("type") if isinstance(fr, dict) else (fr or "abort")
    if finish not in ("stop", "length", "abort"):
        finish = "abort"
    return Completion(
        request_id=request.request_id,
        prompt_token_ids=list(request.prompt_token_ids),
        token_ids=token_ids,
        text=out.get("text", ""),
        logprobs=logprobs,
        finish_reason=finish,
        weight_version=_parse_version(meta.get("weight_version"), -1),
        meta={
            "sample_index": sample.sample_index,
            "rid": meta.get("id", sample.rid),
            "cached_tokens": meta.get("cached_tokens"),
            "e2e_latency": meta.get("e2e_latency"),
        },
    )


# ----------------------------------------------------------------------------- launching
