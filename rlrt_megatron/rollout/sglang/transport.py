"""Weight transport to SGLang servers: serialization, the NCCL side group, the sync modes.

Modes (`SGLangEngine.sync_mode`):
  "tensor"       colocated: CUDA IPC handles of each bucket (no copy), SGLang's own serializer
  "distributed"  separate GPUs/nodes: one NCCL group trainer(rank 0) + every server TP rank,
                 one broadcast per tensor; the HTTP call and the broadcast run concurrently
  "disk"         fallback: sharded safetensors in `sync_dir`, then update_weights_from_disk
SGLang >= 0.5.2x takes tensor and distributed pushes only inside a weight-update session
(/begin_weight_update, the pushes, /end_weight_update); a server without those endpoints (older
releases) gets the pushes alone. On CPU (the test tier) "tensor" passes the tensors through
shared memory by file name (torch's file_system sharing) instead of CUDA IPC handles.
After every sync each server must report the new version (else WeightSyncError); a sample of
parameters can be read back and compared (`verify_stride`). Only the process that iterates the
weights (the trainer's rank 0 of the sync) calls this.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from rlrt_megatron.rollout.sglang.client import SGLangError
from rlrt_megatron.rollout.sglang.server import Server, free_port
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

__all__ = [
    "init_weight_transfer_group",
    "serialize_for_sglang",
    "WeightSync",
]


def serialize_for_sglang(
    bucket: list[NamedTensor], flattened: bool = True
) -> tuple[str, str | None]:
    """One bucket -> (base64 payload, load_format) for /update_weights_from_tensor.

    With SGLang importable we use its own MultiprocessingSerializer (CUDA IPC handles keyed by
    device UUID, so CUDA_VISIBLE_DEVICES may differ) and, if `flattened`, its
    FlattenedTensorBucket (one IPC handle per bucket; needs a single dtype per bucket, see
    `split_by_dtype`). Without SGLang: ForkingPickler of the (name, tensor) list, SGLang's
    default load format (load_format=None). CPU tensors go by shared-memory file name (a
    file descriptor cannot cross to an unrelated process).
    """
    with _share_cpu_by_filename():
        return _serialize(bucket, flattened)


@contextlib.contextmanager
def _share_cpu_by_filename() -> Iterator[None]:
    """torch's "file_system" sharing while pickling: the server (not our child) rebuilds CPU
    storages from /dev/shm names; the default "file_descriptor" strategy would need an fd
    handed over our own multiprocessing connection."""
    import torch.multiprocessing as mp

    prev = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        mp.set_sharing_strategy(prev)


def _serialize(bucket: list[NamedTensor], flattened: bool) -> tuple[str, str | None]:
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


# ----------------------------------------------------------------------------- sync modes


class WeightSync:
    """The weight-sync half of SGLangEngine (a mixin: it reads the engine's `servers`,
    `sync_mode`, `bucket_bytes`, `sync_dir`, `verify_stride`, `verify_rows`, `dtype`,
    `serializer`, `restart_cache`, `master_address`, `model_path` and keeps `_version`,
    `_synced`, `_cache`, `_group`)."""

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
                    # SGLang implements get_weights_by_name per model class (Llama yes,
                    # Qwen3 not in 0.5.23)
                    raise WeightSyncError(
                        f"weight check: server {s.index} (SGLang {s.client.version()}) cannot "
                        f"report {name!r} through /get_weights_by_name (answer "
                        f"{str(got)[:200]!r}); set rollout.sglang_verify_stride=0: the "
                        "trainer's sync check (rollout.sync_check_tol) compares the served "
                        "log-probs with its own after every sync, for every model"
                    )
                compare_probes(f"{name} on server {s.index}", probe.to(torch.float32), got)
        stats["seconds"] = time.perf_counter() - t0
        stats["checked"] = len(probes)
        return stats

    @staticmethod
    @contextlib.contextmanager
    def _weight_session(targets: Sequence[Server]) -> Iterator[None]:
        """/begin_weight_update on every target, /end_weight_update on those that opened one,
        also when the pushes failed (an open session refuses the next begin)."""
        opened: list[Server] = []
        try:
            for s in targets:
                if s.client.begin_weight_update():
                    opened.append(s)
            yield
        finally:
            errors = []
            for s in opened:
                try:
                    s.client.end_weight_update()
                except (SGLangError, WeightSyncError) as e:
                    errors.append(e)
        if errors:
            raise errors[0]

    def _sync_tensor(self, stream, v: str, stats: dict, targets: list[Server]) -> None:
        with self._weight_session(targets):
            self._push_tensor_buckets(stream, v, stats, targets)

    def _push_tensor_buckets(self, stream, v: str, stats: dict, targets: list[Server]) -> None:
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
    def _on_each(servers: Sequence[Server], fn: Callable[[Server], object]) -> list:
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

    def _sync_distributed(self, stream, v: str, stats: dict, targets: list[Server]) -> None:
        import torch.distributed as dist

        if len(targets) != len(self.servers):
            # every server rank is in the group and must take part in each broadcast
            targets = self.servers
        if self._group is None:
            self.init_distributed_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        with self._weight_session(targets), ThreadPoolExecutor(len(self.servers)) as pool:
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

    def _sync_disk(self, stream, v: str, stats: dict, targets: list[Server]) -> None:
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
