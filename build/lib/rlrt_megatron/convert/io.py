"""File helpers shared by both conversion directions: safetensors indexes, dtypes, metadata files.

No megatron imports here: the HF side of the conversion (and the tiny model) only needs these.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

META_FILE = "rlrt_meta.json"
HF_SUBDIR = "hf"  # HF config + tokenizer files kept next to a Megatron checkpoint

# Files copied verbatim between an HF directory and the `hf/` folder of a Megatron checkpoint.
HF_METADATA_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """`"bf16"` / `torch.bfloat16` / None (keep the source dtype) -> a torch dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and dtype not in DTYPES.values():
            raise ValueError(
                f"unsupported dtype {dtype}: weights convert to one of bfloat16, float16, float32"
            )
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(
            f"unsupported dtype {dtype!r}: choose one of {', '.join(sorted(DTYPES))} "
            "(or leave it unset to keep the checkpoint's dtype)"
        )
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: `--hf` must be a Hugging Face model directory (config.json + "
            "*.safetensors)"
        )
    return json.loads(path.read_text())


def safetensors_index(hf_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> the `.safetensors` file holding it (single file or sharded + index)."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: hf_dir / fname for name, fname in weight_map.items()}
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in hf_dir.glob("*.bin"))
        hint = f" (found {bins}: re-save with safe_serialization=True)" if bins else ""
        raise FileNotFoundError(f"no *.safetensors weights in {hf_dir}{hint}")
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[name] = f
    return out


def safetensors_shapes(index: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, safetensors dtype string), read from headers only."""
    from safetensors import safe_open

    out = {}
    for f in sorted(set(index.values())):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118
                sl = st.get_slice(name)
                out[name] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def read_tensors(index: dict[str, Path], names: Iterable[str]) -> list[torch.Tensor]:
    """Read a few tensors (owned copies), opening and closing each file.

    Closing unmaps the file, so pages already read do not stay resident: the conversion's RSS
    then holds the converted tensors, not also the whole mmapped source.
    """
    from safetensors import safe_open

    names = list(names)
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(index[n], []).append(n)
    for f, group in by_file.items():
        with safe_open(str(f), framework="pt") as st:
            for n in group:
                out[n] = st.get_tensor(n)
    return [out[n] for n in names]


def copy_hf_metadata(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the HF config / tokenizer / chat-template files present in `src` into `dst`."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in HF_METADATA_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def check_out_dir(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse a non-empty output directory unless `overwrite` (checked before any work)."""
    out = Path(out_dir)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"output directory {out} exists and is not empty: choose another --out or pass "
            "--overwrite"
        )
    return out


@contextmanager
def atomic_dir(out_dir: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh `<out_dir>.tmp` directory, renamed to `out_dir` only if the body succeeds."""
    out = check_out_dir(out_dir, overwrite=overwrite)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def progress(total: int, desc: str, enabled: bool = True):
    """A tqdm bar (stderr), disabled when not wanted (tests, non-zero ranks)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, dynamic_ncols=True)


# Variables through which `platform.init_distributed` finds a multi-process job (torchrun, Slurm).
DIST_ENV_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
    "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
)  # fmt: skip


def in_multi_rank_job() -> bool:
    """True when torch.distributed is initialised with more than one rank."""
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def run_convert_isolated(args: list[str]) -> None:
    """Run `rlrt convert <args>` in a fresh single-process interpreter and wait for it.

    dist_checkpointing's save/load are collectives over the default process group, so a
    conversion called by one rank of a running job (e.g. rank 0 converting while the others
    wait at a barrier) would hang; the child gets its own 1-rank group instead.
    """
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV_VARS}
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "rlrt_megatron.cli", "convert", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"conversion subprocess failed ({' '.join(cmd)}), exit code {proc.returncode}:\n"
            + proc.stderr[-4000:]
        )


def init_single_process() -> None:
    """`platform.init_distributed(1, 1)` as a 1-rank group, whatever job variables are set.

    A conversion is single-process by design; without this, `rlrt convert` started inside an
    sbatch script (SLURM_NTASKS=8) would wait forever for 7 ranks that never come.
    """
    from rlrt_megatron import platform

    saved = {k: os.environ.pop(k) for k in DIST_ENV_VARS if k in os.environ}
    try:
        platform.init_distributed(tp=1, pp=1)
    finally:
        os.environ.update(saved)


_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
}


class SafetensorsStreamWriter:
    """Write HF safetensors shards tensor by tensor, holding none of them in memory.

    The tensors' names, shapes and dtypes are declared up front (`plan`, in write order), so
    each file's header is written before its data and every `add` goes straight to disk; a
    `safetensors.torch.save_file` per shard would instead hold a whole shard. Files are named
    `model.safetensors`, or `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`
    when the plan exceeds `max_shard_bytes`. The format: u64 header length, JSON header
    (dtype, shape, data_offsets per tensor), raw little-endian data in offset order.
    """

    def __init__(
        self,
        out_dir: str | Path,
        plan: list[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_bytes: int,
    ) -> None:
        if sys.byteorder != "little":  # pragma: no cover - safetensors data is little-endian
            raise RuntimeError(
                "SafetensorsStreamWriter writes raw bytes: needs a little-endian host"
            )
        self.out_dir = Path(out_dir)
        self.plan = plan
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for item in plan:
            nbytes = _nbytes(item[1], item[2])
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(item)
            size += nbytes
        n = len(shards)
        self.files = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.shards = shards
        self.total_bytes = sum(_nbytes(s, d) for _, s, d in plan)
        self._pos = 0  # index into plan
        self._shard = -1
        self._left_in_shard = 0
        self._fh = None

    def _open_next(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._shard += 1
        items = self.shards[self._shard]
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in items:
            end = offset + _nbytes(shape, dtype)
            header[name] = {
                "dtype": _ST_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, end],
            }
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # 8-byte aligned data, as safetensors itself writes
        self._fh = open(self.out_dir / self.files[self._shard], "wb")  # noqa: SIM115
        self._fh.write(len(raw).to_bytes(8, "little"))
        self._fh.write(raw)
        self._left_in_shard = len(items)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor (must match the plan's name, shape and dtype)."""
        if self._pos >= len(self.plan):
            raise ValueError(f"tensor {name} is beyond the {len(self.plan)} planned tensors")
        want = self.plan[self._pos]
        got = (name, tuple(tensor.shape), tensor.dtype)
        if got != want:
            raise ValueError(f"writer expected tensor {want} at position {self._pos}, got {got}")
        if self._left_in_shard == 0:
            self._open_next()
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._fh.write(memoryview(data.numpy()))
        self._pos += 1
        self._left_in_shard -= 1

    def finish(self) -> list[str]:
        """Close the last file, write the index for sharded output, return the file names."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._pos != len(self.plan):
            raise ValueError(
                f"writer got {self._pos} of {len(self.plan)} planned tensors; the next missing "
                f"one is {self.plan[self._pos][0]}"
            )
        if len(self.files) > 1:
            weight_map = {
                name: self.files[i] for i, items in enumerate(self.shards) for name, _, _ in items
            }
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return list(self.files)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()
