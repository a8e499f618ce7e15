"""SGLangEngine: the RolloutEngine over one or more SGLang servers, and its restart policy.

A server that stops answering during `generate` is restarted once and the batch retried; a
second failure raises RolloutServerCrashed. The engine launches its servers (server.py), talks
to them over HTTP (client.py) and pushes weights through transport.py.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from rlrt_megatron.rollout.base import Completion, GenerateRequest, SamplingParams
from rlrt_megatron.rollout.moe_routing import SGLangExperts
from rlrt_megatron.rollout.sglang.client import (
    RolloutServerCrashed,
    Sample,
    SGLangClient,
    SGLangConnectionError,
    SGLangError,
    build_generate_payload,
    build_score_payload,
    expand_samples,
    parse_generate_output,
    parse_score_output,
    require_sglang,
)
from rlrt_megatron.rollout.sglang.partial import continue_rows
from rlrt_megatron.rollout.sglang.server import (
    Server,
    build_launch_command,
    free_port,
    spread,
    start_server,
    stop_server,
    wait_until_healthy,
)
from rlrt_megatron.rollout.sglang.transport import WeightSync, serialize_for_sglang
from rlrt_megatron.rollout.weight_sync import NamedTensor, WeightSyncError, check_weight_version
from rlrt_megatron.topology import sync_address

__all__ = ["SGLangEngine"]


def _require_server_python(python: str) -> None:
    """The interpreter that launches the servers must exist and (when it is ours) have SGLang."""
    # abspath, not realpath: every venv's python links to the same base interpreter
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        require_sglang()
    elif not (os.access(python, os.X_OK) or shutil.which(python)):
        raise SGLangError(
            f"rollout.sglang_python={python!r}: no such interpreter; point it at the python of "
            "a venv with SGLang (e.g. /opt/venv-sglang/bin/python from `make sglang-env`), or "
            "leave it empty to use this interpreter"
        )


def launch_key(api_key: str | None) -> str:
    """The API key of servers we launch: the user's, or a fresh one. Hex: SGLang's `--config`
    loader hands the key to argparse as a word of its own, where a key starting with '-' (1 in 64
    url-safe ones) reads as an option and the server exits (`--api-key: expected one argument`)."""
    if api_key is None:
        return secrets.token_hex(24)
    if api_key.startswith("-"):
        raise ValueError(
            "rollout.sglang_api_key / RLRT_ROLLOUT_API_KEY starts with '-': the SGLang server "
            "we launch would read it as an option (`--api-key: expected one argument`); choose "
            "a key that starts with a letter or digit"
        )
    return api_key


class SGLangEngine(WeightSync):
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
        python: str | None = None,
        env: dict[str, str] | None = None,
        record_experts: bool = False,
        _urls: Sequence[str] | None = None,
    ):
        self.model_path = model_path
        # MoE routing replay: each token's experts from SGLang's return_routed_experts
        self.experts = SGLangExperts(model_path) if record_experts else None
        if record_experts:
            extra_args = [*extra_args, "--enable-return-routed-experts"]
        self.tp = tp
        self.host = host
        self.env = dict(env or {})  # extra environment of launched servers
        # servers we launch always get a key (they may listen on the node's address)
        api_key = api_key or os.environ.get("RLRT_ROLLOUT_API_KEY")
        self.api_key = api_key if _urls is not None else launch_key(api_key)
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
            # remote servers must reach the trainer's TCPStore for the NCCL group: the address
            # of RLRT_SYNC_IFNAME's interface (slurm/launch.sh: RLRT_NET_IF), else the host's
            master_address = host if local else sync_address()
        self.master_address = sync_address(master_address)  # `iface:NAME` -> its address
        self._version = 0
        self._synced = False
        self.restart_cache = restart_cache
        # colocated: hand the GPU back to the trainer after every generate (KV cache only by
        # default: released weights hold garbage until the next update_weights)
        if offload_tags is None:
            offload_tags = ("kv_cache",) if colocated and _urls is None else ()
        self.offload_tags = tuple(offload_tags)
        self._cache: list[NamedTensor] | None = None
        self.text_tools = None  # (tokenizer, stop token ids) of model_path: sglang/partial.py
        self._group = None
        self._group_name = "rlrt_weight_sync"
        self._lock = threading.Lock()
        self.restarts = 0
        self.servers: list[Server] = []
        if _urls is not None:  # connect mode
            for i, url in enumerate(_urls):
                self.servers.append(self._make_server(i, url, None))
            self.wait_healthy()
            return
        self.log_dir = log_dir or os.path.join(os.getcwd(), "runs", "sglang_logs")
        python = python or sys.executable
        if launch_cmd is None:
            _require_server_python(python)
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
                    mem_fraction=mem_fraction,
                    colocated=colocated,
                    seed=None if seed is None else seed + i,
                    dtype=dtype,
                    extra_args=extra_args,
                    python=python,
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
        verify_stride, restart_cache, master_address, extra_args, python, dtype}. `urls`
        non-empty = connect mode.
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
            dtype=opt("dtype", "bfloat16"),
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
            python=opt("python", None),
            seed=int(r.seed),
            log_dir=os.path.join(cfg.run_dir, "sglang_logs"),
            **kwargs,
        )

    def _make_server(self, i: int, url: str, cmd: list[str] | None) -> Server:
        s = Server(index=i, url=url, cmd=cmd, tp=self.tp, api_key=self.api_key)
        s.env = self.env
        s.client = SGLangClient(url, self.api_key, self.request_timeout)
        return s

    # -- process management (tests override _start / wait_healthy)
    def _start(self, s: Server) -> None:
        start_server(s, self.log_dir)

    def _stop(self, s: Server, grace_s: float = 15.0) -> None:
        stop_server(s, grace_s)

    def wait_healthy(self, servers: Sequence[Server] | None = None) -> None:
        wait_until_healthy(servers or self.servers, self.startup_timeout)

    def restart(self, s: Server) -> None:
        if s.cmd is None:
            raise RolloutServerCrashed(
                f"SGLang server {s.index} ({s.url}) stopped answering; it was started outside "
                "this process (connect mode), so it cannot be restarted here"
            )
        self._stop(s)
        self.restarts += 1
        s.starts += 1
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
        return self._serving("generate", lambda: self._generate(requests, sampling))

    def continue_rows(
        self, items: list[tuple], sampling: SamplingParams, need: int
    ) -> list[tuple[list[int], list[float], str | None, str]]:
        """Partial rollouts (`rollout.partial`, `rollout/partial.py`'s contract): continue each
        rollout from prompt + its tokens until `need` of their groups have finished, then abort
        the others on the servers (sglang/partial.py)."""
        if not items:
            return []
        return self._serving("continue_rows", lambda: continue_rows(self, items, sampling, need))

    def _serving(self, what: str, fn: Callable):
        """Run `fn` with the servers' memory resumed (released again after, colocated)."""
        for s in self.servers:
            if "weights" in s.released:
                raise WeightSyncError(
                    f"{what}: server {s.index} released its weights (offload) and no "
                    "update_weights has restored them since"
                )
        self.resume_memory()
        out = fn()
        if self.offload_tags:
            self.release_memory(list(self.offload_tags))
        return out

    def _generate(
        self, requests: list[GenerateRequest], sampling: SamplingParams
    ) -> list[list[Completion]]:
        samples = expand_samples(requests, sampling.n)
        shards = spread(self.servers, samples)

        def run(server: Server, part: list[Sample]) -> list[Completion]:
            payload = build_generate_payload(requests, part, sampling, self.experts is not None)
            outs = self._call_with_restart(server, lambda: server.client.generate(payload))
            if len(outs) != len(part):
                raise SGLangError(
                    f"generate: server {server.index} returned {len(outs)} results for "
                    f"{len(part)} samples"
                )
            comps = [
                parse_generate_output(o, requests[s.request_index], s)
                for o, s in zip(outs, part, strict=True)
            ]
            if self.experts is not None:
                for o, c in zip(outs, comps, strict=True):
                    n = len(c.prompt_token_ids) + len(c.token_ids) - 1
                    routed = (o.get("meta_info") or {}).get("routed_experts")
                    c.meta["routed_experts"] = self.experts.decode(routed, n, c.meta["rid"])
            return comps

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

    def _call_with_restart(self, s: Server, fn: Callable):
        starts = s.starts
        try:
            return fn()
        except SGLangConnectionError as first:
            with self._lock:  # one restart at a time; weight re-sync touches every server
                try:
                    if s.starts == starts:  # not already restarted by a concurrent call
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

    def score(
        self, prompts: list[list[int]], responses: list[list[int]], temperature: float = 1.0
    ) -> list[list[float]]:
        """The served log-probs of `responses[i]` after `prompts[i]` (teacher-forced: SGLang's
        input-token log-probs of the concatenation, nothing sampled), from server 0 with the
        weights it runs now: the trainer's sync check compares them with its own.

        SGLang computes input-token log-probs from the raw logits; at a temperature other than
        1 they are rescaled here as log_softmax(logits / T) cannot be: such a call raises."""
        if temperature != 1.0:
            raise SGLangError(
                f"score: SGLang reports prompt log-probs at temperature 1 only (asked for "
                f"{temperature}); compare at rollout.temperature=1 or rely on the batch check"
            )
        if not prompts:
            return []
        s = self.servers[0]
        payload = build_score_payload(prompts, responses)
        outs = self._call_with_restart(s, lambda: s.client.generate(payload))
        return [
            parse_score_output(o, len(p), len(r))
            for o, p, r in zip(outs, prompts, responses, strict=True)
        ]

    # -- colocated memory hand-off
    def release_memory(
        self,
        tags: Sequence[str] = ("kv_cache", "weights"),
        servers: Sequence[Server] | None = None,
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
        self, tags: Sequence[str] | None = None, servers: Sequence[Server] | None = None
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
