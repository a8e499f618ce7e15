"""SGLang rollout engine: launches (or connects to) SGLang HTTP servers and drives them.

What we call (SGLang's native HTTP API, python/sglang/srt/entrypoints/http_server.py):
  GET  /health                        200 once the server can generate
  GET  /get_weight_version            {"weight_version": str}   (also in /get_model_info)
  POST /generate                      {input_ids: [[int]], sampling_params: {...}, rid: [str],
                                       return_logprob: true} -> [{text, output_ids, meta_info:
                                       {finish_reason: {type}, weight_version,
                                       output_token_logprobs: [[logprob, token_id, text]]}}]
  POST /update_weights_from_tensor    {serialized_named_tensors: [str per TP rank],
                                       load_format, flush_cache, weight_version}
  POST /init_weights_update_group     {master_address, master_port, rank_offset, world_size,
                                       group_name, backend}
  POST /update_weights_from_distributed {names, dtypes, shapes, group_name, flush_cache,
                                       weight_version} (+ an NCCL broadcast per tensor, src 0)
  POST /destroy_weights_update_group  {group_name}
  POST /update_weights_from_disk      {model_path, weight_version}
  POST /release_memory_occupation, /resume_memory_occupation  {tags}
  POST /flush_cache, POST /get_weights_by_name {name, truncate_size}
All requests carry `Authorization: Bearer <api_key>` when the server was given `--api-key`.
Update endpoints answer {"success": bool, "message": str}.

Weight sync modes (`sync_mode`):
  "tensor"       colocated: CUDA IPC handles of each bucket (no copy), SGLang's own serializer
  "distributed"  separate GPUs/nodes: one NCCL group trainer(rank 0) + every server TP rank,
                 one broadcast per tensor; the HTTP call and the broadcast run concurrently
  "disk"         fallback: sharded safetensors in `sync_dir`, then update_weights_from_disk
Only the process that iterates the weights (the trainer's rank 0 of the sync) calls this.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.client import HTTPException

import torch

from rlrt_megatron.rollout.base import Completion, GenerateRequest, SamplingParams
from rlrt_megatron.rollout.weight_sync import (
    NamedTensor,
    WeightSyncError,
    bucket_named_tensors,
    bucket_spec,
    check_weight_version,
    compare_probes,
    format_weight_version,
    param_probe,
    write_hf_checkpoint,
)

GPU_EXTRA_HINT = "install the GPU extra on a CUDA machine: pip install -e '.[gpu]'"


class SGLangError(RuntimeError):
    """The SGLang server answered with an error, or could not be reached."""


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
            raise SGLangError(
                f"SGLang {method} {self.base_url}{path} -> HTTP {e.code}: {detail}"
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
        out = self.request("POST", path, payload, timeout)
        if isinstance(out, dict) and out.get("success") is False:
            raise WeightSyncError(f"SGLang {path} at {self.base_url} failed: {out.get('message')}")
        return out

    # -- status
    def health(self, timeout: float = 10.0) -> bool:
        try:
            self.request("GET", "/health", timeout=timeout)
            return True
        except SGLangError:
            return False

    def get_model_info(self) -> dict:
        return self.request("GET", "/get_model_info")

    def get_weight_version(self) -> str:
        try:
            out = self.request("GET", "/get_weight_version")
        except SGLangError:  # older servers: only /get_model_info has it
            out = self.get_model_info()
        return str(out.get("weight_version"))

    # -- generation
    def generate(self, payload: dict) -> list[dict]:
        out = self.request("POST", "/generate", payload)
        return out if isinstance(out, list) else [out]

    def flush_cache(self) -> None:
        self.request("POST", "/flush_cache")

    # -- weights
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
class _Sample:
    request_index: int
    sample_index: int
    rid: str


def expand_samples(requests: Sequence[GenerateRequest], n: int) -> list[_Sample]:
    """One entry per completion, request-major. rid = "<request_id>/<j>" (unique per call)."""
    out = []
    for i, req in enumerate(requests):
        base = req.request_id or f"req{i}"
        out.extend(_Sample(i, j, f"{base}/{j}") for j in range(n))
    if len({s.rid for s in out}) != len(out):
        raise ValueError("generate: request_ids must be unique within one call")
    return out


def build_generate_payload(
    requests: Sequence[GenerateRequest], samples: Sequence[_Sample], sampling: SamplingParams
) -> dict:
    """A batched /generate body: each sample is its own row (SGLang shares the prompt prefix
    through its radix cache, so repeating the prompt n times costs no extra prefill)."""
    params = sampling_to_sglang(sampling)
    # per-sample seeds (SGLang's `sampling_seed`; honoured with --enable-deterministic-inference)
    per_sample = []
    for s in samples:
        p = dict(params)
        if sampling.seed is not None:
            p["sampling_seed"] = sampling.seed + s.request_index * 100003 + s.sample_index
        per_sample.append(p)
    return {
        "input_ids": [list(requests[s.request_index].prompt_token_ids) for s in samples],
        "sampling_params": per_sample,
        "rid": [s.rid for s in samples],
        "return_logprob": True,
        "logprob_start_len": -1,  # log-probs of the generated tokens only
        "stream": False,
    }


INITIAL_WEIGHT_VERSION = "initial"  # what a server reports before its first sync


def _parse_version(v, default: int) -> int:
    """SGLang's string version -> int; the initial weights ("initial"/"default") -> `default`."""
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


def parse_generate_output(out: dict, request: GenerateRequest, sample: _Sample) -> Completion:
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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def build_launch_command(
    model_path: str,
    *,
    port: int,
    host: str = "127.0.0.1",
    tp: int = 1,
    base_gpu_id: int = 0,
    api_key: str | None = None,
    mem_fraction: float | None = 0.5,
    colocated: bool = True,
    dtype: str = "bfloat16",
    seed: int | None = None,
    extra_args: Sequence[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """The `python -m sglang.launch_server ...` command for one server."""
    flags = {
        "--model-path": model_path,
        "--host": host,
        "--port": port,
        "--tp-size": tp,
        "--base-gpu-id": base_gpu_id,
        "--dtype": dtype,
        # a name no sync uses: a restarted server can never pass for a synced one
        "--weight-version": INITIAL_WEIGHT_VERSION,
        "--mem-fraction-static": mem_fraction,
        "--api-key": api_key or None,
        "--random-seed": seed,
    }
    cmd = [python, "-m", "sglang.launch_server", "--trust-remote-code"]
    for flag, value in flags.items():
        if value is not None:
            cmd += [flag, str(value)]
    if colocated:  # lets release/resume_memory_occupation hand the GPU to the trainer
        cmd.append("--enable-memory-saver")
    return cmd + list(extra_args)


@dataclass
class _Server:
    index: int
    url: str
    cmd: list[str] | None  # None in connect mode (we did not start it)
    tp: int
    proc: subprocess.Popen | None = None
    log_path: str | None = None
    released: set[str] = field(default_factory=set)  # memory tags currently released
    client: SGLangClient = field(init=False)

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return "(no log)"
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])


# ----------------------------------------------------------------------------- serialization


def serialize_for_sglang(
    bucket: list[NamedTensor], flattened: bool = True
) -> tuple[str, str | None]:
    """One bucket -> (base64 payload, load_format) for /update_weights_from_tensor.

    With SGLang importable we use its own MultiprocessingSerializer (CUDA IPC handles keyed by
    device UUID, so CUDA_VISIBLE_DEVICES may differ) and, if `flattened`, its
    FlattenedTensorBucket (one IPC handle per bucket; needs a single dtype per bucket, see
    `split_by_dtype`). Without SGLang: ForkingPickler of the (name, tensor) list, SGLang's
    default load format (load_format=None).
    """
    try:
        from sglang.srt.utils import MultiprocessingSerializer
    except ImportError:
        from multiprocessing.reduction import ForkingPickler

        import torch.multiprocessing  # noqa: F401  (registers the tensor reductions)

        buf = io.BytesIO()
        ForkingPickler(buf).dump([(n, t.detach()) for n, t in bucket])
        return base64.b64encode(buf.getvalue()).decode(), None
    if flattened:
        try:
            from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket
        except ImportError:
            flattened = False
    if flattened:
        fb = FlattenedTensorBucket(named_tensors=[(n, t.detach()) for n, t in bucket])
        obj = {"flattened_tensor": fb.get_flattened_tensor(), "metadata": fb.get_metadata()}
        return MultiprocessingSerializer.serialize(obj, output_str=True), "flattened_bucket"
    obj = [(n, t.detach()) for n, t in bucket]
    return MultiprocessingSerializer.serialize(obj, output_str=True), None


def init_weight_transfer_group(
    backend: str,
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    timeout_s: float = 600.0,
):
    """A process group separate from the trainer's WORLD (trainer rank 0 + server ranks).

    torch only lets a process init one default group, so (like SGLang's own
    init_custom_process_group) we rendezvous on a fresh TCPStore and build the group directly.
    """
    from datetime import timedelta

    import torch.distributed.distributed_c10d as c10d

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(
        c10d.rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout)
    )
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    import inspect

    params = inspect.signature(c10d._new_process_group_helper).parameters
    opt = "backend_options" if "backend_options" in params else "pg_options"
    pg, _ = c10d._new_process_group_helper(
        world_size,
        rank,
        [],
        c10d.Backend(backend),
        store,
        group_name=group_name,
        timeout=timeout,
        **{opt: None},
    )
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def _with_last(it: Iterable) -> Iterator[tuple[object, bool]]:
    it = iter(it)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True


# ----------------------------------------------------------------------------- the engine


class SGLangEngine:
    """RolloutEngine over `num_servers` SGLang servers of `tp` GPUs each.

    Launch mode (default): starts `python -m sglang.launch_server` per server (server i on GPUs
    [i*tp, (i+1)*tp) from `base_gpu_id`), each in its own process group so shutdown kills only
    what we started. Connect mode: `SGLangEngine.connect(urls, ...)` for servers started by the
    Slurm script; they cannot be restarted by us.

    A server that stops answering during `generate` is restarted once and the batch retried;
    a second failure raises RolloutServerCrashed. A restarted server comes back with the initial
    weights, so after a sync it must be brought back to `weight_version`: by
    `on_restart(engine, server_index)` if given, else from the host-memory copy of the last
    sync kept with `restart_cache=True` (one extra device->host copy of the weights per sync;
    needed when the trainer cannot re-iterate its weights from the rank that generates).
    Without either the restart fails the step with a version mismatch (never stale weights).
    """

    def __init__(
        self,
        model_path: str,
        tp: int = 1,
        num_servers: int = 1,
        host: str = "127.0.0.1",
        port: int | None = None,
        api_key: str | None = None,
        mem_fraction: float | None = 0.5,
        colocated: bool = True,
        extra_args: Sequence[str] = (),
        *,
        base_gpu_id: int = 0,
        seed: int | None = None,
        dtype: str = "bfloat16",
        sync_mode: str | None = None,
        bucket_bytes: int = 512 * 1024**2,
        sync_dir: str | None = None,
        verify_stride: int = 0,
        verify_rows: int = 4,
        startup_timeout: float = 900.0,
        request_timeout: float = 3600.0,
        log_dir: str | None = None,
        launch_cmd: Callable[[int, int], list[str]] | None = None,
        serializer: Callable[[list[NamedTensor]], tuple[str, str | None]] | None = None,
        on_restart: Callable[[SGLangEngine, int], None] | None = None,
        restart_cache: bool = False,
        offload_tags: Sequence[str] | None = None,
        master_address: str | None = None,
        _urls: Sequence[str] | None = None,
    ):
        self.model_path = model_path
        self.tp = tp
        self.host = host
        # servers we launch always get a key (they may listen on the node's address)
        api_key = api_key or os.environ.get("RLRT_ROLLOUT_API_KEY")
        if api_key is None and _urls is None:
            api_key = secrets.token_urlsafe(24)
        self.api_key = api_key
        self.colocated = colocated
        self.dtype = getattr(torch, dtype)  # the servers' parameter dtype (probes compare in it)
        self.sync_mode = sync_mode or ("tensor" if colocated else "distributed")
        if self.sync_mode not in ("tensor", "distributed", "disk"):
            raise ValueError(
                f"rollout.sync_mode={self.sync_mode!r}: expected tensor | distributed | disk"
            )
        if self.sync_mode == "disk" and not sync_dir:
            raise ValueError("rollout.sync_mode=disk needs rollout.sync_dir (a shared directory)")
        self.bucket_bytes = bucket_bytes
        self.sync_dir = sync_dir
        self.verify_stride = verify_stride
        self.verify_rows = verify_rows
        self.startup_timeout = startup_timeout
        self.request_timeout = request_timeout
        self.serializer = serializer or serialize_for_sglang
        self.on_restart = on_restart
        if master_address is None:
            hosts = {urllib.parse.urlparse(u).hostname for u in (_urls or [])} | {host}
            local = hosts <= {"127.0.0.1", "localhost"}
            # remote servers must reach the trainer's TCPStore for the NCCL group
            master_address = host if local else socket.gethostbyname(socket.gethostname())
        self.master_address = master_address
        self._version = 0
        self._synced = False
        self.restart_cache = restart_cache
        # colocated: hand the GPU back to the trainer after every generate (KV cache only by
        # default: released weights hold garbage until the next update_weights)
        if offload_tags is None:
            offload_tags = ("kv_cache",) if colocated and _urls is None else ()
        self.offload_tags = tuple(offload_tags)
        self._cache: list[NamedTensor] | None = None
        self._group = None
        self._group_name = "rlrt_weight_sync"
        self._lock = threading.Lock()
        self.restarts = 0
        self.servers: list[_Server] = []
        if _urls is not None:  # connect mode
            for i, url in enumerate(_urls):
                self.servers.append(self._make_server(i, url, None))
            self.wait_healthy()
            return
        self.log_dir = log_dir or os.path.join(os.getcwd(), "runs", "sglang_logs")
        if launch_cmd is None:
            require_sglang()
        for i in range(num_servers):
            p = (port + i) if port else free_port(host)
            cmd = (
                launch_cmd(i, p)
                if launch_cmd
                else build_launch_command(
                    model_path,
                    port=p,
                    host=host,
                    tp=tp,
                    base_gpu_id=base_gpu_id + i * tp,
                    api_key=api_key,
                    mem_fraction=mem_fraction,
                    colocated=colocated,
                    seed=None if seed is None else seed + i,
                    dtype=dtype,
                    extra_args=extra_args,
                )
            )
            self.servers.append(self._make_server(i, f"http://{host}:{p}", cmd))
        try:
            for s in self.servers:
                self._start(s)
            self.wait_healthy()
        except BaseException:
            self.shutdown()
            raise

    @classmethod
    def connect(cls, urls: Sequence[str], model_path: str = "", **kwargs) -> SGLangEngine:
        """Drive already-running servers (e.g. started by the Slurm script)."""
        return cls(model_path, _urls=list(urls), **kwargs)

    @classmethod
    def from_config(cls, cfg, hf_dir: str, **overrides) -> SGLangEngine:
        """The engine a TrainConfig asks for (`rollout.engine=sglang`).

        Reads rollout.sglang_tp / sglang_mem_fraction / sglang_num_servers (0 = visible GPUs /
        tp) / seed, timeouts.init / rollout, and, where the config has them,
        rollout.sglang_{urls, host, api_key, colocated, sync_mode, bucket_mb, sync_dir,
        verify_stride, restart_cache, master_address, extra_args}. `urls` non-empty = connect
        mode.
        """
        r = cfg.rollout

        def opt(name, default):
            v = getattr(r, "sglang_" + name, None)
            return default if v in (None, "", []) else v

        tp = int(r.sglang_tp)
        kwargs = dict(
            tp=tp,
            api_key=opt("api_key", None),
            sync_mode=opt("sync_mode", None),
            bucket_bytes=int(float(opt("bucket_mb", 512)) * 2**20),
            sync_dir=opt("sync_dir", os.path.join(cfg.run_dir, "weight_sync")),
            verify_stride=int(opt("verify_stride", 0)),
            restart_cache=bool(opt("restart_cache", True)),
            master_address=opt("master_address", None),
            startup_timeout=float(cfg.timeouts.init),
            request_timeout=float(cfg.timeouts.rollout),
        )
        kwargs.update(overrides)
        urls = opt("urls", None)
        if urls:
            return cls.connect(list(urls), hf_dir, **kwargs)
        n = int(r.sglang_num_servers) or max(1, torch.cuda.device_count() // tp)
        return cls(
            hf_dir,
            num_servers=n,
            host=opt("host", "127.0.0.1"),
            mem_fraction=float(r.sglang_mem_fraction),
            colocated=bool(opt("colocated", True)),
            extra_args=list(opt("extra_args", [])),
            seed=int(r.seed),
            log_dir=os.path.join(cfg.run_dir, "sglang_logs"),
            **kwargs,
        )

    def _make_server(self, i: int, url: str, cmd: list[str] | None) -> _Server:
        s = _Server(index=i, url=url, cmd=cmd, tp=self.tp)
        s.client = SGLangClient(url, self.api_key, self.request_timeout)
        return s

    # -- process management
    def _start(self, s: _Server) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        s.log_path = os.path.join(self.log_dir, f"server{s.index}.log")
        log = open(s.log_path, "a")
        try:
            # start_new_session: the server and its scheduler children form one process group
            # that shutdown() signals as a whole, never touching anyone else's processes.
            s.proc = subprocess.Popen(
                s.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log.close()

    def _stop(self, s: _Server, grace_s: float = 15.0) -> None:
        proc = s.proc
        if proc is None:
            return
        if proc.poll() is not None:
            # the launcher died; its scheduler/detokenizer children (our process group) may
            # live on holding GPU memory
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(grace_s)
        except ProcessLookupError:
            pass

    def wait_healthy(self, servers: Sequence[_Server] | None = None) -> None:
        deadline = time.monotonic() + self.startup_timeout
        for s in servers or self.servers:
            while not s.client.health(timeout=5.0):
                if not s.alive():
                    raise SGLangError(
                        f"SGLang server {s.index} ({s.url}) exited with code "
                        f"{s.proc.returncode} before becoming healthy; log {s.log_path}:\n"
                        f"{s.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise SGLangError(
                        f"SGLang server {s.index} ({s.url}) not healthy after "
                        f"{self.startup_timeout:.0f}s; log {s.log_path}:\n{s.log_tail()}"
                    )
                time.sleep(0.2)

    def restart(self, s: _Server) -> None:
        if s.cmd is None:
            raise RolloutServerCrashed(
                f"SGLang server {s.index} ({s.url}) stopped answering; it was started outside "
                "this process (connect mode), so it cannot be restarted here"
            )
        self._stop(s)
        self.restarts += 1
        self._start(s)
        s.released = set()
        self.wait_healthy([s])
        if self._synced:
            if self.sync_mode == "distributed":
                self._reset_distributed_group()
            if self.on_restart is not None:
                self.on_restart(self, s.index)
            elif self._cache is not None:
                self._resync_from_cache(s.index)
            reported = s.client.get_weight_version()
            check_weight_version(self._version, reported, f"restarted server {s.index}")

    # -- RolloutEngine protocol
    @property
    def weight_version(self) -> int:
        return self._version

    def health(self) -> bool:
        return all(s.alive() and s.client.health() for s in self.servers)

    def generate(
        self, requests: list[GenerateRequest], sampling: SamplingParams
    ) -> list[list[Completion]]:
        if not requests or sampling.n < 1:
            return [[] for _ in requests]
        for s in self.servers:
            if "weights" in s.released:
                raise WeightSyncError(
                    f"generate: server {s.index} released its weights (offload) and no "
                    "update_weights has restored them since"
                )
        self.resume_memory()
        out = self._generate(requests, sampling)
        if self.offload_tags:
            self.release_memory(list(self.offload_tags))
        return out

    def _generate(
        self, requests: list[GenerateRequest], sampling: SamplingParams
    ) -> list[list[Completion]]:
        samples = expand_samples(requests, sampling.n)
        # contiguous, balanced shards: server k gets samples [bounds[k], bounds[k+1])
        k = len(self.servers)
        bounds = [len(samples) * i // k for i in range(k + 1)]
        shards = [(s, samples[bounds[i] : bounds[i + 1]]) for i, s in enumerate(self.servers)]
        shards = [(s, part) for s, part in shards if part]

        def run(server: _Server, part: list[_Sample]) -> list[Completion]:
            payload = build_generate_payload(requests, part, sampling)
            outs = self._call_with_restart(server, lambda: server.client.generate(payload))
            if len(outs) != len(part):
                raise SGLangError(
                    f"generate: server {server.index} returned {len(outs)} results for "
                    f"{len(part)} samples"
                )
            return [
                parse_generate_output(o, requests[s.request_index], s)
                for o, s in zip(outs, part, strict=True)
            ]

        if len(shards) == 1:
            results = [run(*shards[0])]
        else:
            with ThreadPoolExecutor(len(shards)) as pool:
                results = list(pool.map(lambda a: run(*a), shards))
        grouped: list[list[Completion]] = [[] for _ in requests]
        for (_, part), comps in zip(shards, results, strict=True):
            for s, c in zip(part, comps, strict=True):
                grouped[s.request_index].append(c)
        return grouped

    def _call_with_restart(self, s: _Server, fn: Callable):
        try:
            return fn()
        except SGLangConnectionError as first:
            with self._lock:  # one restart at a time; weight re-sync touches every server
                try:
                    self.restart(s)
                except (SGLangError, WeightSyncError) as e:
                    raise RolloutServerCrashed(
                        f"SGLang server {s.index} ({s.url}) failed ({first}) and could not be "
                        f"restarted: {e}"
                    ) from e
            try:
                return fn()
            except SGLangConnectionError as second:
                raise RolloutServerCrashed(
                    f"SGLang server {s.index} ({s.url}) failed again after one restart "
                    f"({second}); failing the step. Log {s.log_path}:\n{s.log_tail()}"
                ) from second

    # -- weights
    def update_weights(
        self,
        named_tensors: Iterable[NamedTensor],
        version: int,
        servers: Sequence[int] | None = None,
    ) -> dict:
        """Push the weights as `version` (to `servers`, default all), check each server reports
        it, optionally compare a sample of parameters (every `verify_stride`-th tensor, rotating
        with the version). Returns {"bytes", "seconds", "buckets", "checked"}."""
        v = format_weight_version(version)
        targets = [self.servers[i] for i in servers] if servers is not None else self.servers
        probes: dict[str, torch.Tensor] = {}
        self.resume_memory(["weights"], targets)

        cache: list[NamedTensor] | None = [] if self.restart_cache and servers is None else None

        def tap(stream: Iterable[NamedTensor]) -> Iterator[NamedTensor]:
            for i, (name, t) in enumerate(stream):
                if self.verify_stride and i % self.verify_stride == version % self.verify_stride:
                    probes[name] = param_probe(t, self.verify_rows, self.dtype)
                if cache is not None:
                    cache.append((name, t.detach().to("cpu", copy=True)))
                yield name, t

        t0 = time.perf_counter()
        stats = {"bytes": 0, "buckets": 0}
        stream = tap(named_tensors)
        if self.sync_mode == "tensor":
            self._sync_tensor(stream, v, stats, targets)
        elif self.sync_mode == "distributed":
            self._sync_distributed(stream, v, stats, targets)
        else:
            self._sync_disk(stream, v, stats, targets)
        for s in targets:
            check_weight_version(version, s.client.get_weight_version(), f"server {s.index}")
        self._version = version
        self._synced = True
        if cache is not None:
            self._cache = cache
        for name, probe in probes.items():
            for s in targets:
                try:
                    got = s.client.get_weights_by_name(name, self.verify_rows)
                except SGLangError as e:
                    got = str(e)
                if got is None or isinstance(got, str):
                    # SGLang implements get_weights_by_name per model class (Llama yes, Qwen3
                    # not in every version)
                    raise WeightSyncError(
                        f"weight check: server {s.index} cannot report {name!r} "
                        f"(answer {str(got)[:200]!r}); set rollout.sglang_verify_stride=0: "
                        "the trainer's sync check (rollout.sync_check_tol, logprobs phase) "
                        "still compares the engine's log-probs with its own after every sync"
                    )
                compare_probes(f"{name} on server {s.index}", probe.to(torch.float32), got)
        stats["seconds"] = time.perf_counter() - t0
        stats["checked"] = len(probes)
        return stats

    def _sync_tensor(self, stream, v: str, stats: dict, targets: list[_Server]) -> None:
        flattened = self.serializer is serialize_for_sglang
        buckets = bucket_named_tensors(stream, self.bucket_bytes, split_by_dtype=flattened)
        for bucket, last in _with_last(buckets):
            payload, load_format = self.serializer(bucket)
            self._on_each(
                targets,
                lambda s, payload=payload, load_format=load_format, last=last: (
                    s.client.update_weights_from_tensor(
                        [payload] * s.tp, load_format, v if last else None, flush_cache=last
                    )
                ),
            )
            stats["buckets"] += 1
            stats["bytes"] += sum(t.numel() * t.element_size() for _, t in bucket)
            # the IPC handles keep the bucket alive; the servers have copied it by now
            del bucket, payload

    @staticmethod
    def _on_each(servers: Sequence[_Server], fn: Callable[[_Server], object]) -> list:
        """fn(server) for every server, concurrently when there are several (each copies on
        its own GPUs); the first error is raised after all finished."""
        if len(servers) == 1:
            return [fn(servers[0])]
        with ThreadPoolExecutor(len(servers)) as pool:
            futs = [pool.submit(fn, s) for s in servers]
            return [f.result() for f in futs]

    def init_distributed_group(self, backend: str = "nccl", port: int | None = None) -> None:
        """Form the trainer(rank 0) + all server ranks group; called once, lazily."""
        world = 1 + sum(s.tp for s in self.servers)
        port = port or free_port(self.master_address)
        offsets, off = [], 1
        for s in self.servers:
            offsets.append(off)
            off += s.tp
        with ThreadPoolExecutor(len(self.servers)) as pool:
            futs = [
                pool.submit(
                    s.client.init_weights_update_group,
                    self.master_address,
                    port,
                    o,
                    world,
                    self._group_name,
                    backend,
                )
                for s, o in zip(self.servers, offsets, strict=True)
            ]
            self._group = init_weight_transfer_group(
                backend, self.master_address, port, 0, world, self._group_name
            )
            for f in futs:
                f.result()

    def _sync_distributed(self, stream, v: str, stats: dict, targets: list[_Server]) -> None:
        import torch.distributed as dist

        if len(targets) != len(self.servers):
            # every server rank is in the group and must take part in each broadcast
            targets = self.servers
        if self._group is None:
            self.init_distributed_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        with ThreadPoolExecutor(len(self.servers)) as pool:
            for bucket, last in _with_last(bucket_named_tensors(stream, self.bucket_bytes)):
                spec = bucket_spec(bucket)
                futs = [
                    pool.submit(
                        s.client.update_weights_from_distributed,
                        spec,
                        self._group_name,
                        v if last else None,
                        last,
                    )
                    for s in targets
                ]
                handles = [
                    dist.broadcast(t.detach().contiguous(), 0, group=self._group, async_op=True)
                    for _, t in bucket
                ]
                for h in handles:
                    h.wait()
                for f in futs:
                    f.result()
                stats["buckets"] += 1
                stats["bytes"] += sum(t.numel() * t.element_size() for _, t in bucket)

    def _sync_disk(self, stream, v: str, stats: dict, targets: list[_Server]) -> None:
        out = os.path.join(self.sync_dir, f"weights_v{v}")
        counted = []

        def count(it):
            for n, t in it:
                counted.append(t.numel() * t.element_size())
                yield n, t

        write_hf_checkpoint(count(stream), out, template_dir=self.model_path or None)
        self._on_each(targets, lambda s: s.client.update_weights_from_disk(out, v))
        stats["buckets"] = 1
        stats["bytes"] = sum(counted)
        # keep one full copy on the shared disk: the servers have loaded this one
        prev, self._disk_dir = getattr(self, "_disk_dir", None), out
        if prev and prev != out:
            shutil.rmtree(prev, ignore_errors=True)

    def _resync_from_cache(self, index: int) -> None:
        dev = "cuda" if self.sync_mode == "tensor" and torch.cuda.is_available() else "cpu"
        cached = self._cache or []
        self.update_weights(((n, t.to(dev)) for n, t in cached), self._version, servers=[index])

    def _reset_distributed_group(self) -> None:
        """A restarted server left the NCCL group: tear it down everywhere; the next sync
        forms a new one with every server."""
        for s in self.servers:
            try:
                s.client.destroy_weights_update_group(self._group_name)
            except (SGLangError, WeightSyncError):
                pass  # the restarted server has no such group
        if self._group is not None:
            import torch.distributed as dist

            dist.destroy_process_group(self._group)
            self._group = None

    # -- colocated memory hand-off
    def release_memory(
        self,
        tags: Sequence[str] = ("kv_cache", "weights"),
        servers: Sequence[_Server] | None = None,
    ) -> None:
        """Free the servers' GPU memory (SGLang tags "kv_cache", "weights") while the trainer
        runs. Needs `--enable-memory-saver` (set when colocated). Released weights hold
        garbage until the next update_weights."""
        for s in servers or self.servers:
            todo = [t for t in tags if t not in s.released]
            if todo:
                s.client.release_memory_occupation(todo)
                s.released.update(todo)

    def resume_memory(
        self, tags: Sequence[str] | None = None, servers: Sequence[_Server] | None = None
    ) -> None:
        """Re-allocate released memory (`tags` None = everything released)."""
        for s in servers or self.servers:
            todo = sorted(s.released if tags is None else s.released & set(tags))
            if todo:
                s.client.resume_memory_occupation(todo)
                s.released.difference_update(todo)

    def shutdown(self) -> None:
        if self._group is not None:
            try:
                import torch.distributed as dist

                dist.destroy_process_group(self._group)
            except Exception:
                pass
            self._group = None
        for s in self.servers:
            self._stop(s)

    def __enter__(self) -> SGLangEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
