"""Every difference between the megatron-core releases we support (0.16.x on Python 3.11, 0.19.x on
Python 3.12) in one place; call sites use these helpers instead of checking versions.

Differences found between 0.16.1 and 0.19.2, for the APIs this project uses:

=============================== =================================================================
what                            how it is handled
=============================== =================================================================
parallel_state,                 same signatures for everything we call (0.19 adds keyword-only
get_forward_backward_func,      options we do not use): no shim. Checked by the default tier on
OptimizerConfig,                both versions.
get_megatron_optimizer,
OptimizerParamScheduler,
GPTModel, layer specs
layer spec builders             0.19's ``get_gpt_layer_local_spec`` and ``..._te_spec`` take
                                ``*args, **kwargs`` (forwarded to ``*_submodules``); the keywords
                                we pass are accepted by both.
CPU shims (platform.py)         the modules with literal ``device="cuda"`` allocations exist in
                                both; ``tensor_parallel.random``'s private RNG helpers keep their
                                signatures. No version branch needed.
dist checkpoint common state    0.16 writes non-tensor state to ``common.pt``; 0.19 writes it as a
                                ``common_state`` object inside the ``.distcp`` files (and still
                                reads ``common.pt``). :func:`load_common_strategy` lets 0.16 read
                                0.19 checkpoints; :func:`checkpoint_load_errors` names the writer's
                                version when a load fails anyway.
distributed-optimizer formats   ``fully_reshardable`` (resume at another DP/TP/PP size) fails to
                                load with torch's Adam on both (the loader skips the per-parameter
                                ``step`` and then copies it): ``trainer/checkpoint.py`` sets the
                                step aside around megatron's loader (the trainer state restores
                                it). ``fully_sharded_model_space`` (megatron's default) needs
                                flattened ranges that dist_checkpointing rejects: never used.
llama3 RoPE scaling             both hard-code low/high freq factors 1/4 and an original context of
                                8192 in ``RotaryEmbedding.__init__``, but their ``_apply_scaling``
                                takes all three: :func:`apply_llama3_rope` recomputes ``inv_freq``
                                with the HF config's values (any Llama 3.x variant).
log chatter                     0.19 logs deprecation notices on every run that users cannot act
                                on (its own sync save path, GPTModel -> HybridModel, DDP layout):
                                filtered from its loggers (:func:`quiet_megatron_logs`).
fused cross-entropy             ``cross_entropy_loss_fusion`` / ``cross_entropy_fusion_impl`` apply
                                to GPTModel's own loss; we compute log-probs from hidden states
                                (logprobs.py), so neither is used on any version.
=============================== =================================================================
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform as _py_platform
from collections.abc import Iterator
from typing import Any

import torch

__all__ = [
    "LLAMA3_ROPE_DEFAULTS",
    "MCORE_VERSION",
    "SUPPORTED",
    "VERSIONS_FILE",
    "apply_llama3_rope",
    "checkpoint_load_errors",
    "checkpoint_writer",
    "dist_load",
    "dist_save",
    "load_common_state",
    "load_common_strategy",
    "mcore_version",
    "quiet_megatron_logs",
    "versions",
]

# The megatron-core releases this code base is tested with (pyproject.toml: >=0.16,<0.20).
SUPPORTED = ((0, 16), (0, 19))


def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron-core")
    except PackageNotFoundError:  # pragma: no cover - a source checkout on PYTHONPATH
        import megatron.core

        return str(getattr(megatron.core, "__version__", "0"))


MCORE_VERSION = _installed_version()


def mcore_version() -> tuple[int, ...]:
    """The installed megatron-core as a tuple, e.g. ``(0, 19, 2)``."""
    return _version_tuple(MCORE_VERSION)


def versions() -> dict[str, str]:
    """What wrote a checkpoint (stored in its trainer state, named in load errors)."""
    return {
        "megatron_core": MCORE_VERSION,
        "torch": torch.__version__.split("+")[0],
        "python": _py_platform.python_version(),
    }


# ---- log chatter --------------------------------------------------------------------------

# megatron-core 0.19 notices, logged on every run, that a user of this project cannot act on
# (logger -> message prefix). Shown again with PYTHONWARNINGS set (as trainer/cli.py does for
# warnings).
_QUIET_LOGS = {
    # its synchronous dist-checkpoint save runs through the deprecated async path
    "megatron.core.dist_checkpointing.strategies.torch": "MCore's async save is deprecated",
    # GPTModel is frozen in favour of HybridModel; 0.19 is the newest release we allow (<0.20)
    "megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED",
    # DDP computes the distributed-optimizer layout itself when not handed one
    "megatron.core.distributed.distributed_data_parallel": "DistributedDataParallel: full_param",
}


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_megatron_logs() -> None:
    """Filter :data:`_QUIET_LOGS` from megatron's loggers (idempotent; installed on import)."""
    if os.environ.get("PYTHONWARNINGS"):
        return
    for name, prefix in _QUIET_LOGS.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in log.filters):
            log.addFilter(_DropPrefix(prefix))


quiet_megatron_logs()


# ---- dist checkpoints ---------------------------------------------------------------------

VERSIONS_FILE = "rlrt_versions.json"  # beside megatron's metadata.json: who wrote the checkpoint
_COMMON_PT = "common.pt"  # megatron-core <= 0.18 keeps non-tensor state here


def checkpoint_writer(checkpoint_dir: str | os.PathLike) -> dict[str, str] | None:
    """The versions that wrote a dist checkpoint (None when it predates the stamp)."""
    path = os.path.join(checkpoint_dir, VERSIONS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _format_of(checkpoint_dir: str | os.PathLike) -> str:
    if os.path.isfile(os.path.join(checkpoint_dir, _COMMON_PT)):
        return "common.pt layout (megatron-core <= 0.18)"
    return "embedded common state (megatron-core >= 0.19)"


def _read_embedded_common(checkpoint_dir: str | os.PathLike) -> dict:
    """The ``common_state`` object megatron-core 0.19 stores inside the ``.distcp`` files (what
    its ``load_common_state_dict`` reads), for 0.16, which only knows ``common.pt``."""
    import io

    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    key = ShardedObject("common_state", None, (1,), (0,)).unique_key
    state: dict[str, Any] = {key: io.BytesIO()}
    dcp_load(state, storage_reader=FileSystemReader(str(checkpoint_dir)), no_dist=True)
    loaded = state[key]
    if isinstance(loaded, io.BytesIO):
        loaded.seek(0)
        loaded = torch.load(loaded, weights_only=True)
    return loaded[0] if isinstance(loaded, (list, tuple)) else loaded


def load_common_state(checkpoint_dir: str | os.PathLike) -> dict:
    """The non-tensor part of a dist checkpoint written by any supported version."""
    if os.path.isfile(os.path.join(checkpoint_dir, _COMMON_PT)):
        return torch.load(os.path.join(checkpoint_dir, _COMMON_PT), map_location="cpu",
                          weights_only=False)  # fmt: skip
    return _read_embedded_common(checkpoint_dir)


def load_common_strategy(checkpoint_dir: str | os.PathLike) -> Any:
    """A ``common_strategy`` for megatron-core 0.16's ``dist_checkpointing.load`` that reads a
    0.19 checkpoint's embedded common state; None where the default works (0.19 reads both
    layouts; 0.16 reads its own)."""
    if mcore_version() >= (0, 19) or os.path.isfile(os.path.join(checkpoint_dir, _COMMON_PT)):
        return None
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class EmbeddedCommonLoadStrategy(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):  # noqa: ANN001, ANN201
            return _read_embedded_common(checkpoint_dir)

    return EmbeddedCommonLoadStrategy()


@contextlib.contextmanager
def checkpoint_load_errors(checkpoint_dir: str | os.PathLike) -> Iterator[None]:
    """Re-raise a failed load of a checkpoint written by another megatron-core with the writer's
    version and the way to convert it; other failures pass through unchanged."""
    try:
        yield
    except Exception as e:
        writer = checkpoint_writer(checkpoint_dir)
        if writer is not None and writer.get("megatron_core") == MCORE_VERSION:
            raise
        wrote = (
            f"megatron-core {writer['megatron_core']} (torch {writer.get('torch')}, Python "
            f"{writer.get('python')})"
            if writer
            else f"an unrecorded megatron-core version ({_format_of(checkpoint_dir)})"
        )
        raise RuntimeError(
            f"could not load the Megatron checkpoint {checkpoint_dir}, written by {wrote}, with "
            f"megatron-core {MCORE_VERSION}: {type(e).__name__}: {e}. Load it with the version "
            f"that wrote it, or go through Hugging Face weights: `rlrt convert megatron-to-hf "
            f"--ckpt {checkpoint_dir} --out HF_DIR` there, then `rlrt convert hf-to-megatron "
            f"--hf HF_DIR --out NEW_DIR` here (optimizer state is not carried over)"
        ) from e


def dist_load(sharded_state_dict: dict, checkpoint_dir: str | os.PathLike, **kwargs: Any) -> Any:
    """``dist_checkpointing.load`` that reads checkpoints of every supported version."""
    from megatron.core import dist_checkpointing

    strategy = load_common_strategy(checkpoint_dir)
    if strategy is not None:
        kwargs.setdefault("common_strategy", strategy)
    with checkpoint_load_errors(checkpoint_dir):
        return dist_checkpointing.load(sharded_state_dict, str(checkpoint_dir), **kwargs)


def dist_save(sharded_state_dict: dict, checkpoint_dir: str | os.PathLike, **kwargs: Any) -> Any:
    """``dist_checkpointing.save`` plus :data:`VERSIONS_FILE` (rank 0), read by load errors."""
    from megatron.core import dist_checkpointing

    out = dist_checkpointing.save(sharded_state_dict, str(checkpoint_dir), **kwargs)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        with open(os.path.join(checkpoint_dir, VERSIONS_FILE), "w") as f:
            json.dump(versions(), f)
    return out


# ---- RoPE ---------------------------------------------------------------------------------

# What megatron's RotaryEmbedding applies when built with rope_scaling=True (both versions).
LLAMA3_ROPE_DEFAULTS = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def apply_llama3_rope(model: Any, rope: dict[str, Any]) -> None:
    """Give a GPTModel built with ``rope_scaling=True`` the HF config's llama3 RoPE scaling.

    Megatron's ``RotaryEmbedding.__init__`` calls ``_apply_scaling(inv_freq, factor=...)`` with
    the defaults above; its ``_apply_scaling`` (transformers' ``_compute_llama3_parameters``)
    takes the other three too, so ``inv_freq`` is recomputed from the unscaled frequencies with
    the config's values. A no-op when they equal the defaults (bit-identical to megatron's own).
    """
    params = {k: rope.get(k, v) for k, v in LLAMA3_ROPE_DEFAULTS.items()}
    if all(float(params[k]) == float(v) for k, v in LLAMA3_ROPE_DEFAULTS.items()):
        return
    emb = getattr(model, "rotary_pos_emb", None)
    if emb is None:  # a stage without attention inputs still has one; be explicit otherwise
        raise ValueError("apply_llama3_rope: the model has no rotary_pos_emb (not a RoPE model)")
    dim = emb.inv_freq.numel() * 2
    base = float(rope["rope_theta"])
    unscaled = 1.0 / (
        base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=emb.inv_freq.device) / dim)
    )
    emb.inv_freq = emb._apply_scaling(
        unscaled,
        factor=float(rope["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )
