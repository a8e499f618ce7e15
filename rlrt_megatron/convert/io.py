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


@contextmanager
def atomic_dir(out_dir: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh `<out_dir>.tmp` directory, renamed to `out_dir` only if the body succeeds."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"output directory {out} exists and is not empty: choose another --out or pass "
                "--overwrite"
            )
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
