"""Megatron-Core distributed checkpoint -> Hugging Face safetensors + config + tokenizer.

No model is built and no TP/PP layout is needed: the checkpoint's global tensors are read one
decoder layer at a time (a `ShardedTensor` covering just that layer's slice of each stacked
tensor), unfused per `mapping.RULES`, and written straight into the output safetensors file
(headers are planned from the checkpoint metadata). Peak tensor memory is about one layer.

Works on checkpoints written by `hf_to_megatron` and on the trainer's checkpoints (any TP x PP
they were saved at; any extra keys such as optimizer state are ignored). The HF config and
tokenizer come from `<ckpt>/hf/`, `<ckpt>/../hf/` or an explicit `hf_config_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from rlrt_megatron.convert import io, mapping

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def resolve_dist_checkpoint(path: str | Path) -> Path:
    """The Megatron dist checkpoint directory (the one holding `metadata.json`) of `path`: that
    directory itself, a trainer checkpoint `iter_N/` (its `dist/`), or a trainer checkpoint root
    (the `iter_N/dist` its `latest` file names)."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    if (path / "dist" / "metadata.json").is_file():
        return path / "dist"
    if (path / "latest").is_file():
        name = (path / "latest").read_text().strip()
        if (path / name / "dist" / "metadata.json").is_file():
            return path / name / "dist"
        raise FileNotFoundError(
            f"{path}: `latest` names {name!r} but {path / name}/dist holds no checkpoint "
            "(metadata.json); pass an iter_N directory explicitly"
        )
    raise FileNotFoundError(
        f"{path} is not a Megatron dist checkpoint (no metadata.json), a trainer checkpoint "
        "iter_N/ (with dist/) or a checkpoint root with a `latest` file"
    )


def find_hf_metadata_dir(ckpt_dir: Path, hf_config_dir: str | Path | None) -> Path:
    candidates = (
        [Path(hf_config_dir)]
        if hf_config_dir
        else [ckpt_dir / io.HF_SUBDIR, ckpt_dir.parent / io.HF_SUBDIR]
    )
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    raise FileNotFoundError(
        f"no HF config.json for checkpoint {ckpt_dir}: looked in "
        f"{', '.join(str(c) for c in candidates)}; pass --hf-config DIR (a directory with the "
        "model's config.json and tokenizer files)"
    )


def _resolve_keys(
    entry: mapping.Entry,
    spec: str,
    metadata: dict,
    shape: mapping.ModelShape,
    ckpt: Path,
    prefix: str = "",
) -> tuple[str, mapping.Entry]:
    """(checkpoint key, the entry in the checkpoint's layer layout) for one entry; both Megatron
    layer layouts (stacked, per-layer) are accepted."""
    key = prefix + entry.sharded_key(spec)
    if key not in metadata and entry.layer is not None:  # the other layer layout
        other = dataclasses.replace(entry, stacked=not entry.stacked)
        if prefix + other.sharded_key(spec) in metadata:
            key, entry = prefix + other.sharded_key(spec), other
    if key not in metadata and entry.rule.when == "moe":
        # a MoE layer's pre-MLP norm: the local spec saves it under TE's fused name
        other_key = prefix + entry.sharded_key("local" if spec == "te" else "te")
        other_key = other_key.replace(
            "pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"
        )
        key = other_key if other_key in metadata else key
    if key not in metadata:
        raise KeyError(
            f"checkpoint {ckpt} has no tensor {key!r} (needed for "
            f"{', '.join(entry.hf_names())}); is config.json the one of this checkpoint?"
        )
    expected = mapping.megatron_shape(entry, shape)
    expected = (*(size for _, _, size in entry.stack_offsets(shape)), *expected)
    got = tuple(metadata[key].global_shape)
    ok = got == expected
    if entry.rule.vocab:  # padded rows are allowed (sliced off)
        ok = got[1:] == expected[1:] and got[0] >= expected[0]
    if not ok:
        raise ValueError(
            f"checkpoint {ckpt}: tensor {key!r} has global shape {list(got)}, expected "
            f"{list(expected)} from config.json ({', '.join(entry.hf_names())})"
        )
    return key, entry


def megatron_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    hf_config_dir: str | Path | None = None,
    key_prefix: str = "",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    show_progress: bool = True,
) -> Path:
    """Convert the model weights of a Megatron dist checkpoint into an HF model directory.

    dtype: output dtype (`bf16`, `fp16`, `fp32`); None keeps the checkpoint's dtype.
    key_prefix: prefix of the model's keys in the checkpoint (e.g. `teacher.` for a teacher copy
        saved next to the policy); "" for the policy / converted checkpoints.
    Output: `model.safetensors` (or `model-0000i-of-0000N.safetensors` + index above
    `max_shard_bytes`), config.json (dtype updated), generation config and tokenizer files.
    A single-process operation: called from one rank of a multi-rank job (the others waiting),
    it runs in a child process with its own 1-rank process group.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from rlrt_megatron import platform
    from rlrt_megatron.megatron import compat

    target = io.parse_dtype(dtype)
    ckpt = resolve_dist_checkpoint(ckpt_dir)
    meta_dir = find_hf_metadata_dir(ckpt, hf_config_dir)
    config = io.read_hf_config(meta_dir)
    shape = mapping.model_shape(config)
    io.check_out_dir(out_dir, overwrite=overwrite)

    if io.in_multi_rank_job():
        args = ["megatron-to-hf", "--ckpt", str(ckpt), "--out", str(out_dir), "--hf-config",
                str(meta_dir), "--max-shard-bytes", str(max_shard_bytes),
                f"--key-prefix={key_prefix}"]  # fmt: skip
        args += ["--dtype", io.dtype_name(target)] if target else []
        args += ["--overwrite"] if overwrite else []
        io.run_convert_isolated(args)
        return Path(out_dir)
    owns_dist = not torch.distributed.is_initialized()
    if owns_dist:
        io.init_single_process()
    try:
        metadata = dist_checkpointing.load_tensors_metadata(str(ckpt))
        spec = mapping.detect_spec([k for k in metadata if k.startswith(key_prefix)])
        all_entries = list(mapping.entries(shape))
        keys = {e: _resolve_keys(e, spec, metadata, shape, ckpt, key_prefix) for e in all_entries}
        # One dist_checkpointing.load per group, written out before the next is read: the
        # embedding, each decoder layer, then the final norm (+ lm_head).
        groups: list[list[mapping.Entry]] = []
        for e in all_entries:
            if groups and groups[-1][0].layer == e.layer:  # layers separate head and tail
                groups[-1].append(e)
            else:
                groups.append([e])
        with (
            io.atomic_dir(out_dir, overwrite=overwrite) as tmp,
            io.progress(len(all_entries), "megatron -> hf", show_progress) as bar,
        ):
            hf_shapes = mapping.expected_hf_shapes(shape)
            plan = [
                (n, hf_shapes[n], target or metadata[keys[e][0]].dtype)
                for e in all_entries
                for n in e.hf_names()
            ]
            writer = io.SafetensorsStreamWriter(tmp, plan, max_shard_bytes)
            for group in groups:
                request = {}
                for e in group:
                    key, stored = keys[e]
                    md = metadata[key]
                    # a [1, (1,) ...] slice of the stacked tensor (no prepend_axis_num: megatron's
                    # legacy path for that cannot read a single shard of a regular grid)
                    offsets = stored.stack_offsets(shape)
                    local = torch.empty(
                        (*(1 for _ in offsets), *md.global_shape[len(offsets) :]), dtype=md.dtype
                    )
                    request[f"{key}|{e.expert}"] = ShardedTensor.from_rank_offsets(
                        key, local, *offsets, replica_id=0
                    )
                # partial reads (one layer of a stacked tensor) by design: skip the coverage check
                loaded = compat.dist_load(  # reads every supported megatron-core's layout
                    request, str(ckpt), validate_access_integrity=False
                )
                for e in group:
                    full = loaded.pop(f"{keys[e][0]}|{e.expert}")
                    full = full[(0,) * len(keys[e][1].stack_offsets(shape))]
                    if e.rule.vocab:
                        full = full[: shape.vocab_size]
                    tensors = mapping.unfuse(e.rule, full, shape)
                    for name, t in zip(e.hf_names(), tensors, strict=True):
                        t = t.to(target) if target is not None else t
                        writer.add(name, t)
                    bar.update(1)
                del loaded
            files = writer.finish()
            io.copy_hf_metadata(meta_dir, tmp)
            cfg = json.loads((tmp / "config.json").read_text())
            cfg["dtype"] = io.dtype_name(plan[0][2])
            cfg.pop("torch_dtype", None)
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    finally:
        if owns_dist:
            platform.destroy_distributed()
    logger.info("wrote HF model %s (%s)", out_dir, ", ".join(files))
    return Path(out_dir)
