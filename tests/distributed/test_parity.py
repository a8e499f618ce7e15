"""HF <-> Megatron conversion on the tiny models: bit-exact round trips, logit parity at every
TP x PP in {1,2}^2, exact `iter_hf_weights`, and re-export of a checkpoint saved at TP2 x PP2.

Spawns: one process converts everything (module fixture), one 4-process job covers all layouts
of all models, interleaved pipelining included (`init_distributed` rebuilds the groups per
layout), plus one run of `tools/check_parity.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
# vocab 1000: not a multiple of 128, so every layout pads (1024) and exports must slice
MODELS = {
    "qwen3_tied": dict(arch="qwen3", tied=True, vocab_size=1000, seed=1),
    "qwen3_untied": dict(arch="qwen3", tied=False, vocab_size=1000, seed=2),
    "llama3_gqa": dict(arch="llama", tied=False, vocab_size=1000, seed=3),
    "qwen3_4layers": dict(arch="qwen3", tied=True, vocab_size=1000, seed=4, num_layers=4),
}
LAYOUTS = [(1, 1, None), (2, 1, None), (1, 2, None), (2, 2, None)]  # (tp, pp, vpp)
# (model, checkpoint, tp, pp, vpp); the last case of a model is its TP2 x PP2 one
CASES = [(n, "mc", *lay) for n in ("qwen3_tied", "qwen3_untied", "llama3_gqa") for lay in LAYOUTS]
CASES += [
    ("qwen3_tied", "mc_te", 2, 2, None),  # TE-named checkpoint into the local-spec model
    ("qwen3_4layers", "mc", 1, 2, 2),  # interleaved pipeline: 2 chunks per rank
    ("qwen3_4layers", "mc", 2, 2, 2),
]
TRAINER_EXPORT = {"qwen3_tied": "", "llama3_gqa": "teacher."}  # model -> key prefix exported
PARITY_TOL = 1e-4


def load_hf_tensors(d: Path) -> dict[str, torch.Tensor]:
    index = d / "model.safetensors.index.json"
    if not index.exists():
        return load_file(d / "model.safetensors")
    out = {}
    for f in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        out.update(load_file(d / f))
    return out


def _convert_all(rank: int, world_size: int, root: str) -> dict:
    """Single process: every conversion the tests inspect, and the error messages."""
    from rlrt_megatron.convert.hf_to_megatron import hf_to_megatron
    from rlrt_megatron.convert.megatron_to_hf import megatron_to_hf

    r = Path(root)
    for name in MODELS:
        hf_to_megatron(r / name / "hf", r / name / "mc", show_progress=False)
        # tiny shards so the sharded-output + index path is what the round trip reads back
        megatron_to_hf(r / name / "mc", r / name / "back", max_shard_bytes=200_000,
                       show_progress=False)  # fmt: skip
    q = r / "qwen3_tied"
    hf_to_megatron(q / "hf", q / "mc_te", spec="te", show_progress=False)
    megatron_to_hf(q / "mc_te", q / "back_te", show_progress=False)
    hf_to_megatron(q / "hf", q / "mc_bf16", dtype="bf16", show_progress=False)
    megatron_to_hf(q / "mc_bf16", q / "back_bf16", show_progress=False)
    megatron_to_hf(q / "mc_bf16", q / "back_bf16_fp32", dtype="fp32", show_progress=False)
    errors = {}
    try:  # a config that does not match the checkpoint (untied Llama vs tied Qwen3)
        megatron_to_hf(q / "mc", q / "bad", hf_config_dir=r / "llama3_gqa" / "hf",
                       show_progress=False)  # fmt: skip
    except (KeyError, ValueError) as e:
        errors["wrong_config"] = str(e)
    try:
        hf_to_megatron(q / "hf", q / "mc", show_progress=False)
    except FileExistsError as e:
        errors["exists"] = str(e)
    from rlrt_megatron import platform
    from rlrt_megatron.convert.io import read_hf_config
    from rlrt_megatron.convert.load import load_checkpoint_into_model
    from rlrt_megatron.megatron.model import build_model

    platform.init_distributed(tp=1, pp=1)
    try:  # a Llama checkpoint (no q/k norms) into a Qwen3 model
        load_checkpoint_into_model(build_model(read_hf_config(q / "hf")), r / "llama3_gqa" / "mc")
    except KeyError as e:
        errors["wrong_model"] = str(e)
    finally:
        platform.destroy_distributed()
    return errors


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, dict]:
    from rlrt_megatron.convert.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("convert")
    for name, kw in MODELS.items():
        make_tiny_model(root / name / "hf", **kw)
    errors = run_distributed(_convert_all, 1, str(root))[0]
    return root, errors


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_megatron_hf_is_bit_exact(converted, name: str) -> None:
    root, _ = converted
    src, back = root / name / "hf", root / name / "back"
    a, b = load_hf_tensors(src), load_hf_tensors(back)
    assert sorted(a) == sorted(b)
    assert ("lm_head.weight" in a) == (not MODELS[name]["tied"])
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert (back / "model.safetensors.index.json").exists()  # the sharded-output path ran
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
              "chat_template.jinja"):  # fmt: skip
        assert (src / f).read_bytes() == (back / f).read_bytes(), f
    cfg_a = json.loads((src / "config.json").read_text())
    cfg_b = json.loads((back / "config.json").read_text())
    assert {k: v for k, v in cfg_b.items() if k != "dtype"} == {
        k: v for k, v in cfg_a.items() if k != "dtype"
    }
    meta = json.loads((root / name / "mc" / "rlrt_meta.json").read_text())
    assert meta["vocab_size"] == 1000 and meta["dtype"] == "float32" and meta["spec"] == "local"
    assert meta["num_parameters"] == sum(t.numel() for t in a.values())


def test_te_names_and_dtypes(converted) -> None:
    root, _ = converted
    q = root / "qwen3_tied"
    a = load_hf_tensors(q / "hf")
    te = load_hf_tensors(q / "back_te")
    assert all(torch.equal(a[k], te[k]) for k in a) and sorted(a) == sorted(te)
    bf16 = load_hf_tensors(q / "back_bf16")
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], a[k].bfloat16()) for k in a)
    up = load_hf_tensors(q / "back_bf16_fp32")
    assert all(
        up[k].dtype == torch.float32 and torch.equal(up[k], a[k].bfloat16().float()) for k in a
    )
    assert json.loads((q / "back_bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_conversion_errors_are_named(converted) -> None:
    _, errors = converted
    assert "output_layer.weight" in errors["wrong_config"]
    assert "lm_head.weight" in errors["wrong_config"]
    assert "not empty" in errors["exists"] and "--overwrite" in errors["exists"]
    assert "lacks 2 parameter(s)" in errors["wrong_model"]
    assert "decoder.layers.self_attention.q_layernorm.weight" in errors["wrong_model"]


def _layouts_worker(rank: int, world_size: int, root: str) -> dict:
    """Every model x layout: logits vs HF, iter_hf_weights vs the HF files, and at TP2 x PP2 a
    trainer-style save exported back to HF by rank 0."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from rlrt_megatron import platform
    from rlrt_megatron.convert.io import read_hf_config
    from rlrt_megatron.convert.load import (
        iter_hf_weights,
        load_checkpoint_into_model,
        model_sharded_state_dict,
    )
    from rlrt_megatron.convert.megatron_to_hf import megatron_to_hf
    from rlrt_megatron.convert.parity import hf_logits, megatron_logits, random_batch
    from rlrt_megatron.megatron.model import build_model

    torch.set_num_threads(1)
    out: dict = {}
    r = Path(root)
    try:
        for name in MODELS:
            hf_dir = r / name / "hf"
            config = read_hf_config(hf_dir)
            reference = load_hf_tensors(hf_dir)
            tokens = random_batch(1000, 2, 17, seed=rank // 4)
            ref_logits = hf_logits(hf_dir, tokens)
            for case in [c for c in CASES if c[0] == name]:
                _, ckpt_name, tp, pp, vpp = case
                platform.init_distributed(tp=tp, pp=pp, vpp=vpp)
                chunks = build_model(config, tp=tp, pp=pp, vpp=vpp, params_dtype=torch.float32)
                load_checkpoint_into_model(chunks, r / name / ckpt_name)
                logits = megatron_logits(chunks, tokens, 1000)
                diff = None if logits is None else float((logits - ref_logits).abs().max())
                exported = dict(iter_hf_weights(chunks))
                exact = sorted(exported) == sorted(reference) and all(
                    torch.equal(exported[k], reference[k]) for k in reference
                )
                out[case] = (diff, exact)
            if name not in TRAINER_EXPORT:
                continue
            # `chunks` is now the TP2 x PP2 model: save it like the trainer does (padded vocab,
            # swiglu factories, tied copy on the last stage), then export it from rank 0 alone
            # while the others wait (the conversion runs in its own 1-rank child process)
            save = r / name / "trainer_ckpt"
            if rank == 0:
                save.mkdir()
            dist.barrier()
            state = model_sharded_state_dict(chunks)  # + a prefixed copy, as F saves a teacher
            state["teacher"] = chunks[0].sharded_state_dict(prefix="teacher.")
            dist_checkpointing.save(state, str(save))
            if rank == 0:
                back = megatron_to_hf(save, r / name / "trainer_back", hf_config_dir=hf_dir,
                                      key_prefix=TRAINER_EXPORT[name],
                                      show_progress=False)  # fmt: skip
                again = load_hf_tensors(back)
                out[(name, "trainer")] = sorted(again) == sorted(reference) and all(
                    torch.equal(again[k], reference[k]) for k in reference
                )
            dist.barrier()
    finally:
        platform.destroy_distributed()
    return out


@pytest.mark.slow  # the slow tier (make test-slow, run by .ci/run): keeps make test < 15 min
def test_parity_and_export_at_every_layout(converted) -> None:
    root, _ = converted
    results = run_distributed(_layouts_worker, 4, str(root))
    for case in CASES:
        _, _, tp, pp, vpp = case
        diffs = [res[case][0] for res in results]
        measured = [d for d in diffs if d is not None]
        # every last-stage rank compares (DP replicas and TP ranks alike)
        assert len(measured) == 4 // pp, (case, diffs)
        assert max(measured) < PARITY_TOL, (case, measured)
        assert all(res[case][1] for res in results), case
    for name in TRAINER_EXPORT:
        assert results[0][(name, "trainer")] is True, name


def test_check_parity_tool(converted) -> None:
    root, _ = converted
    d = root / "llama3_gqa"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "check_parity.py"), "--hf", str(d / "hf"),
         "--ckpt", str(d / "mc"), "--tp", "2", "--pp", "1"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "leaked semaphore" not in proc.stderr, proc.stderr[-3000:]  # everything it opened closed
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("max_abs_logit_diff=")
    assert float(last.split("=", 1)[1]) < PARITY_TOL
