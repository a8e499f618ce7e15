"""Engine-agnostic weight sync: size-bounded buckets, flat byte buffers, versions, checks.

The trainer streams `(hf_name, full_tensor)` pairs (convert.load.iter_hf_weights); the rollout
engine wants them in a few large transfers. `bucket_named_tensors` groups the stream into
buckets of at most `bucket_bytes` (a tensor larger than that travels alone), keeping the order
and never holding more than one bucket. After a sync the engine's reported version must equal
the trainer's (`check_weight_version`), and optionally a sample of parameters is compared
between the two sides (`sample_param_names`, `param_probe`, `compare_probes`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

NamedTensor = tuple[str, torch.Tensor]


class WeightSyncError(RuntimeError):
    """A weight sync did not leave the rollout engine with the trainer's weights."""


class WeightVersionMismatch(WeightSyncError):
    pass


class WeightMismatch(WeightSyncError):
    pass


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def bucket_named_tensors(
    named_tensors: Iterable[NamedTensor], bucket_bytes: int, *, split_by_dtype: bool = False
) -> Iterator[list[NamedTensor]]:
    """Group a stream of (name, tensor) into buckets of at most `bucket_bytes` bytes.

    Every tensor lands in exactly one bucket, in input order. A tensor larger than
    `bucket_bytes` gets a bucket of its own (the open bucket is closed first). With
    `split_by_dtype` a dtype change also closes the bucket (flat buffers need one dtype).
    Duplicate names raise: the engine would silently load the later one.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes={bucket_bytes}: must be > 0")
    seen: set[str] = set()
    bucket: list[NamedTensor] = []
    size = 0
    for name, tensor in named_tensors:
        if name in seen:
            raise ValueError(f"weight sync: parameter {name!r} appears twice in the stream")
        seen.add(name)
        nbytes = tensor_nbytes(tensor)
        if bucket and (
            size + nbytes > bucket_bytes or (split_by_dtype and tensor.dtype != bucket[0][1].dtype)
        ):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
        if size >= bucket_bytes:  # full, or one oversized tensor on its own
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


@dataclass(frozen=True)
class FlatMeta:
    """Where one tensor lives inside a flat uint8 buffer."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # bytes
    nbytes: int


def flatten_bucket(bucket: Sequence[NamedTensor]) -> tuple[torch.Tensor, list[FlatMeta]]:
    """Pack a bucket into one contiguous uint8 buffer (one copy) plus the metadata to unpack it.

    A byte buffer (not a same-dtype concat) keeps mixed-dtype buckets exact: fp32 norms next
    to bf16 matrices round-trip bit for bit. Offsets are padded to 16 bytes.

    The copy is one `torch.cat(out=)` (a batched copy kernel on CUDA, a parallel memcpy on CPU),
    not a Python loop of per-tensor slice copies: with ~300 tensors per bucket the loop's
    launches and slicing cost more than the bytes (0.12x of the copy bandwidth on an H200).
    The bytes are concatenated as the widest word (8, 4, 2 or 1 bytes) that every tensor's size
    and offset allow, since a CUDA copy kernel moves one element per thread per step.
    Non-contiguous tensors are made contiguous first (an extra copy of those only).
    """
    if not bucket:
        raise ValueError("flatten_bucket: empty bucket")
    device = bucket[0][1].device
    raw = [t.detach().reshape(-1).view(torch.uint8) for _, t in bucket]
    word = next(
        w
        for w in (8, 4, 2, 1)
        if all(b.numel() % w == 0 and b.storage_offset() % w == 0 for b in raw)
    )
    wdtype = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[word]
    pieces: list[torch.Tensor] = []
    metas: list[FlatMeta] = []
    zeros: torch.Tensor | None = None
    total = 0
    for (name, t), b in zip(bucket, raw, strict=True):
        n = b.numel()
        metas.append(FlatMeta(name, tuple(t.shape), t.dtype, total, n))
        pieces.append(b.view(wdtype))
        total += n
        pad = _align(total) - total  # a multiple of `word`: offsets are multiples of 16
        if pad:
            if zeros is None:
                zeros = torch.zeros(_ALIGN // word, dtype=wdtype, device=device)
            pieces.append(zeros[: pad // word])
            total += pad
    flat = torch.empty(total, dtype=torch.uint8, device=device)
    torch.cat(pieces, out=flat.view(wdtype))
    return flat, metas


_ALIGN = 16  # every tensor starts 16-byte aligned, so a uint8 slice can be viewed as any dtype


def _align(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


def unflatten_bucket(flat: torch.Tensor, metas: Sequence[FlatMeta]) -> list[NamedTensor]:
    """Inverse of `flatten_bucket`: views into `flat`, no copy."""
    return [
        (m.name, flat[m.offset : m.offset + m.nbytes].view(m.dtype).reshape(m.shape)) for m in metas
    ]


def bucket_spec(bucket: Sequence[NamedTensor]) -> dict:
    """names / dtypes / shapes lists as SGLang's update_weights_from_distributed expects."""
    return {
        "names": [n for n, _ in bucket],
        "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
        "shapes": [list(t.shape) for _, t in bucket],
    }


# ----------------------------------------------------------------------------- versions


def format_weight_version(version: int) -> str:
    """The string sent to and reported by the engine (SGLang keeps versions as strings)."""
    return str(int(version))


def check_weight_version(expected: int, reported, where: str) -> None:
    """Raise WeightVersionMismatch unless the engine at `where` reports version `expected`."""
    if str(reported) != format_weight_version(expected):
        raise WeightVersionMismatch(
            f"weight sync: {where} reports weight_version={reported!r} after syncing version "
            f"{expected}; the rollout engine is not serving the trainer's weights "
            "(a failed or partial update, or a server restart that reloaded the initial weights)"
        )


# ----------------------------------------------------------------------------- checks


def sample_param_names(names: Sequence[str], k: int, seed: int = 0) -> list[str]:
    """A deterministic sample of `k` names: the first and last plus `k - 2` seeded draws."""
    names = list(names)
    if k >= len(names):
        return names
    if k <= 0:
        return []
    picked = {names[0], names[-1]} if k >= 2 else {names[0]}
    rest = [n for n in names if n not in picked]
    picked.update(random.Random(seed).sample(rest, k - len(picked)))
    return [n for n in names if n in picked]


def param_probe(
    tensor: torch.Tensor, rows: int, engine_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The first `rows` entries along dim 0, as float32 on CPU: what SGLang's
    `/get_weights_by_name` returns (`param[:truncate_size]`). Rounded through `engine_dtype`
    first (the engine stores e.g. bf16 copies of fp32 trainer weights), so equal means exact."""
    t = tensor.detach()[:rows]
    if engine_dtype is not None and t.is_floating_point():
        t = t.to(engine_dtype)
    return t.to(device="cpu", dtype=torch.float32)


def tensor_checksum(tensor: torch.Tensor) -> dict:
    """Order-sensitive float64 checksums: a flipped value or a transposed/shuffled shard shows."""
    x = tensor.detach().to(torch.float64).reshape(-1)
    pos = torch.arange(1, x.numel() + 1, dtype=torch.float64, device=x.device)
    return {
        "numel": x.numel(),
        "sum": float(x.sum()),
        "abs_sum": float(x.abs().sum()),
        "weighted_sum": float((x * pos).sum() / max(x.numel(), 1)),
    }


def compare_probes(name: str, expected: torch.Tensor, got, *, atol: float = 0.0) -> float:
    """Compare the trainer's probe of `name` with the engine's; return the max abs diff.

    `got` may be narrower on the last dim (a TP-sharded server returns its first shard's
    columns for row-parallel weights); the common prefix is compared. Raises WeightMismatch.
    """
    got_t = torch.as_tensor(got, dtype=torch.float32)
    exp = expected.to(torch.float32)
    if got_t.dim() != exp.dim() or got_t.shape[0] != exp.shape[0]:
        raise WeightMismatch(
            f"weight check: {name}: engine returned shape {tuple(got_t.shape)}, trainer probe "
            f"has shape {tuple(exp.shape)}"
        )
    if got_t.dim() > 1 and got_t.shape[-1] < exp.shape[-1]:
        exp = exp[..., : got_t.shape[-1]]
    if got_t.shape != exp.shape:
        raise WeightMismatch(
            f"weight check: {name}: engine shape {tuple(got_t.shape)} vs trainer {tuple(exp.shape)}"
        )
    diff = float((got_t - exp).abs().max()) if exp.numel() else 0.0
    if not diff <= atol:  # also catches NaN
        raise WeightMismatch(
            f"weight check: {name} differs between trainer and rollout engine "
            f"(max |diff| = {diff:.3g} > atol {atol:g}); the sync corrupted or skipped it"
        )
    return diff


def compare_checksums(name: str, expected: dict, got: dict, *, rtol: float = 1e-6) -> None:
    """Raise WeightMismatch if two `tensor_checksum`s disagree beyond `rtol`."""
    for key in ("numel", "sum", "abs_sum", "weighted_sum"):
        a, b = float(expected[key]), float(got[key])
        if not abs(a - b) <= rtol * max(abs(a), abs(b), 1.0):
            raise WeightMismatch(
                f"weight check: {name} checksum {key} differs: trainer {a!r}, engine {b!r}"
            )


def check_logprob_agreement(
    train_logprobs: torch.Tensor,
    engine_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    max_mean_abs_diff: float = 0.1,
) -> dict:
    """Engine-agnostic sync check: the trainer's log-probs of the sampled tokens against the
    engine's behaviour log-probs, both from the same weights version ([B, T] + mask).

    Kernel and precision differences (bf16 engine vs trainer) give a mean |diff| of ~1e-3 to
    1e-2; a missed or corrupted tensor gives O(1). Returns {"logprob_abs_diff_mean",
    "logprob_abs_diff_max", "logprob_diff_mean"}; raises WeightMismatch above the bound.
    """
    m = mask.to(torch.bool)
    if not m.any():
        return {"logprob_abs_diff_mean": 0.0, "logprob_abs_diff_max": 0.0, "logprob_diff_mean": 0.0}
    d = (train_logprobs.detach().float() - engine_logprobs.detach().float())[m]
    out = {
        "logprob_abs_diff_mean": float(d.abs().mean()),
        "logprob_abs_diff_max": float(d.abs().max()),
        "logprob_diff_mean": float(d.mean()),
    }
    if not out["logprob_abs_diff_mean"] <= max_mean_abs_diff:
        raise WeightMismatch(
            f"weight check: trainer and rollout engine disagree on the sampled tokens' "
            f"log-probs (mean |diff| {out['logprob_abs_diff_mean']:.3g} > {max_mean_abs_diff:g} "
            f"over {int(m.sum())} tokens): the engine is not running the trainer's weights"
        )
    return out


# ----------------------------------------------------------------------------- disk


def write_hf_checkpoint(
    named_tensors: Iterable[NamedTensor],
    out_dir: str,
    *,
    template_dir: str | None = None,
    shard_bytes: int = 2 * 1024**3,
) -> str:
    """Write (name, tensor) pairs as a sharded safetensors HF checkpoint in `out_dir`.

    Config/tokenizer files (anything not a weight file) are copied from `template_dir` so an
    engine can load the directory as a model path (`update_weights_from_disk`). Written to
    `out_dir.tmp` then renamed, so a reader never sees half a checkpoint.
    """
    from safetensors.torch import save_file

    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if template_dir:
        for fname in os.listdir(template_dir):
            src = os.path.join(template_dir, fname)
            if (
                os.path.isfile(src)
                and not fname.endswith((".safetensors", ".bin", ".pt"))
                and (fname != "model.safetensors.index.json")
            ):
                shutil.copy2(src, os.path.join(tmp, fname))
    shards: list[list[NamedTensor]] = list(bucket_named_tensors(named_tensors, shard_bytes))
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(
            {n: t.detach().to("cpu").contiguous() for n, t in shard},
            os.path.join(tmp, fname),
            metadata={"format": "pt"},
        )
        for n, t in shard:
            weight_map[n] = fname
            total += tensor_nbytes(t)
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
