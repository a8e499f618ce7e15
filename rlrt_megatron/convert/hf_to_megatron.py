"""Hugging Face safetensors -> Megatron-Core distributed checkpoint (loads at any TP x PP).

No model is built: each HF tensor is read, fused per `mapping.RULES`, and wrapped in a
`ShardedTensor` that describes it in the global (TP- and PP-independent) layout Megatron's own
`GPTModel.sharded_state_dict()` uses. `dist_checkpointing.save` then writes it, so the only
tensor memory is one copy of the model in the target dtype (the source is read tensor by tensor
and its files are unmapped after each read).

Output directory:
    <out>/                      the dist checkpoint (metadata.json, *.distcp, common.pt)
    <out>/hf/                   config.json, generation_config.json, tokenizer + chat template
    <out>/rlrt_meta.json        source, vocab sizes, dtype, layer spec, parameter count
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from rlrt_megatron.convert import io, mapping
from rlrt_megatron.megatron.model import gpt_model_kwargs_from_hf

logger = logging.getLogger(__name__)


def check_hf_tensors(
    shape: mapping.ModelShape, found: dict[str, tuple[tuple[int, ...], str]], where: str
) -> None:
    """Raise one error naming every missing, unexpected and mis-shaped tensor."""
    expected = mapping.expected_hf_shapes(shape)
    ignorable = {"lm_head.weight"} if shape.tied else set()  # some tied exports keep a copy
    missing = sorted(set(expected) - set(found))
    extra = sorted(n for n in set(found) - set(expected) - ignorable if "rotary_emb" not in n)
    bad = [
        f"{n}: expected {list(expected[n])}, got {list(found[n][0])}"
        for n in sorted(set(expected) & set(found))
        if tuple(found[n][0]) != expected[n]
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing[:20])}")
    if extra:
        problems.append(f"unexpected tensors ({len(extra)}): {', '.join(extra[:20])}")
    if bad:
        problems.append(f"mis-shaped tensors ({len(bad)}): " + "; ".join(bad[:20]))
    if problems:
        raise ValueError(
            f"{where} does not match its config.json ({shape.model_type}, {shape.num_layers} "
            f"layers, tie_word_embeddings={shape.tied}):\n  " + "\n  ".join(problems) + "\n"
            "Check that config.json belongs to these weights (e.g. num_hidden_layers, "
            "num_key_value_heads, head_dim, tie_word_embeddings)."
        )


def inspect_hf_dir(hf_dir: str | Path) -> tuple[mapping.ModelShape, dict[str, Path]]:
    """Validate an HF directory (architecture, RoPE settings the loader accepts, tensor names and
    shapes) from config.json and the safetensors headers only."""
    config = io.read_hf_config(hf_dir)
    shape = mapping.model_shape(config)
    try:
        # what the loader would refuse (e.g. llama3 RoPE scaling that megatron-core cannot
        # express) is refused here, before any conversion work
        gpt_model_kwargs_from_hf(config)
    except ValueError as e:
        raise ValueError(f"{Path(hf_dir) / 'config.json'}: {e}") from None
    index = io.safetensors_index(hf_dir)
    check_hf_tensors(shape, io.safetensors_shapes(index), str(hf_dir))
    return shape, index


def build_sharded_state_dict(
    hf_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    spec: str = "local",
    show_progress: bool = True,
) -> tuple[dict, mapping.ModelShape, torch.dtype]:
    """Read `hf_dir` tensor by tensor into a `{name: ShardedTensor}` dict (global layout)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    shape, index = inspect_hf_dir(hf_dir)
    sharded: dict = {}
    out_dtype = None
    all_entries = list(mapping.entries(shape))
    with io.progress(len(all_entries), "hf -> megatron", show_progress) as bar:
        for entry in all_entries:
            tensors = io.read_tensors(index, entry.hf_names())
            fused = mapping.fuse(entry.rule, tensors, shape)
            del tensors
            fused = fused.to(dtype) if dtype is not None else fused
            fused = fused.contiguous()
            out_dtype = out_dtype or fused.dtype
            key = entry.sharded_key(spec)
            offsets = entry.stack_offsets(shape)
            sharded[entry.megatron_name(spec) if offsets else key] = (
                ShardedTensor.from_rank_offsets(
                    key, fused, *offsets, replica_id=0, prepend_axis_num=len(offsets)
                )
            )
            bar.update(1)
    return sharded, shape, out_dtype


def hf_to_megatron(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    spec: str = "local",
    overwrite: bool = False,
    show_progress: bool = True,
) -> Path:
    """Convert an HF Qwen3 / Llama checkpoint into a Megatron dist checkpoint at `out_dir`.

    dtype: target dtype (`bf16`, `fp16`, `fp32`); None keeps the HF tensors' dtype.
    spec: parameter names of the layer spec to write (`local`, `torch` = local names, `te`, or
        `auto` = the spec `megatron.model.resolve_spec` picks here); any loads into any spec
        through `load_checkpoint_into_model`, which renames keys when they differ.
    A single-process operation: it initialises a 1-rank gloo group if none exists; called from
    one rank of a multi-rank job (the others waiting), it runs in a child process.
    """
    from rlrt_megatron import platform
    from rlrt_megatron.megatron import compat

    target = io.parse_dtype(dtype)
    if spec == "auto":
        from rlrt_megatron.megatron.model import resolve_spec

        spec = resolve_spec(spec)
    if spec not in mapping.SPECS:
        raise ValueError(f"unknown layer spec {spec!r}; choose one of {mapping.SPECS}")
    hf_dir = Path(hf_dir)
    inspect_hf_dir(hf_dir)  # fail on a bad directory before starting any process group
    io.check_out_dir(out_dir, overwrite=overwrite)
    if io.in_multi_rank_job():
        args = ["hf-to-megatron", "--hf", str(hf_dir), "--out", str(out_dir), "--spec", spec]
        args += (["--dtype", io.dtype_name(target)] if target else []) + (
            ["--overwrite"] if overwrite else []
        )
        io.run_convert_isolated(args)
        return Path(out_dir)
    owns_dist = not torch.distributed.is_initialized()
    if owns_dist:
        io.init_single_process()
    try:
        sharded, shape, out_dtype = build_sharded_state_dict(
            hf_dir, dtype=target, spec=spec, show_progress=show_progress
        )
        n_params = sum(t.data.numel() for t in sharded.values())
        with io.atomic_dir(out_dir, overwrite=overwrite) as tmp:
            compat.dist_save(sharded, tmp)  # + who wrote it (load errors name it)
            del sharded
            io.copy_hf_metadata(hf_dir, tmp / io.HF_SUBDIR)
            meta = {
                "format": "rlrt-megatron dist checkpoint",
                "source": str(hf_dir.resolve()),
                "model_type": shape.model_type,
                "vocab_size": shape.vocab_size,
                "stored_vocab_rows": shape.vocab_size,
                "tie_word_embeddings": shape.tied,
                "num_layers": shape.num_layers,
                "dtype": io.dtype_name(out_dtype),
                "spec": spec,
                "num_parameters": n_params,
            }
            (tmp / io.META_FILE).write_text(json.dumps(meta, indent=1))
    finally:
        if owns_dist:
            platform.destroy_distributed()
    logger.info("wrote Megatron checkpoint %s (%d parameters)", out_dir, n_params)
    return Path(out_dir)
