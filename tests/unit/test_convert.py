"""Pure tests of the conversion table, its transforms, the tiny model and the HF-side checks."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from rlrt_megatron.convert import io, mapping
from rlrt_megatron.convert.hf_to_megatron import check_hf_tensors, inspect_hf_dir

QWEN3 = dict(
    model_type="qwen3",
    num_hidden_layers=2,
    hidden_size=8,
    intermediate_size=12,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=3,
    vocab_size=10,
    tie_word_embeddings=True,
)


def _shape(**kw) -> mapping.ModelShape:
    return mapping.model_shape({**QWEN3, **kw})


def test_qkv_fusion_is_megatron_gqa_layout() -> None:
    """Rows of linear_qkv: per KV group, its q heads, then its k head, then its v head."""
    s = _shape()  # 4 q heads, 2 groups, head_dim 3
    hd, hidden = s.head_dim, s.hidden
    # every row of q/k/v carries its (kind, head) identity
    q = torch.stack([torch.full((hidden,), 100.0 + h) for h in range(4) for _ in range(hd)])
    k = torch.stack([torch.full((hidden,), 200.0 + g) for g in range(2) for _ in range(hd)])
    v = torch.stack([torch.full((hidden,), 300.0 + g) for g in range(2) for _ in range(hd)])
    rule = next(r for r in mapping.RULES if r.fuse == "qkv")
    fused = mapping.fuse(rule, [q, k, v], s)
    heads = fused[::hd, 0].tolist()
    assert heads == [100, 101, 200, 300, 102, 103, 201, 301]
    back = mapping.unfuse(rule, fused, s)
    assert all(torch.equal(a, b) for a, b in zip(back, [q, k, v], strict=True))


def _megatron_tp_split(rule: mapping.Rule, full: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """How Megatron shards the TP=1 tensor over `tp` ranks (independent of merge_tp_shards)."""
    if rule.tp_axis is None:
        return [full] * tp
    if rule.fuse == "gate_up":
        gate, up = torch.chunk(full, 2, dim=0)
        return [torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp), strict=True)]
    return list(torch.chunk(full, tp, dim=rule.tp_axis))


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("rule", mapping.RULES, ids=lambda r: r.local.split(".")[-2])
def test_merge_tp_shards_inverts_megatron_split(rule: mapping.Rule, tp: int) -> None:
    full = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)
    if rule.tp_axis is None:
        full = full[0]
    merged = mapping.merge_tp_shards(rule, _megatron_tp_split(rule, full, tp))
    assert torch.equal(merged, full)


def test_gate_up_fusion_order() -> None:
    s = _shape()
    rule = next(r for r in mapping.RULES if r.fuse == "gate_up")
    gate, up = torch.randn(12, 8), torch.randn(12, 8)
    fused = mapping.fuse(rule, [gate, up], s)
    assert torch.equal(fused[:12], gate) and torch.equal(fused[12:], up)
    g2, u2 = mapping.unfuse(rule, fused, s)
    assert torch.equal(g2, gate) and torch.equal(u2, up)


def test_entries_tied_untied_and_llama() -> None:
    tied = [n for e in mapping.entries(_shape()) for n in e.hf_names()]
    untied = [n for e in mapping.entries(_shape(tie_word_embeddings=False)) for n in e.hf_names()]
    llama = [n for e in mapping.entries(_shape(model_type="llama")) for n in e.hf_names()]
    assert "lm_head.weight" not in tied and untied[-1] == "lm_head.weight"
    assert set(untied) - set(tied) == {"lm_head.weight"}
    assert tied[0] == "model.embed_tokens.weight" and tied[-1] == "model.norm.weight"
    assert not any("q_norm" in n or "k_norm" in n for n in llama)
    assert set(tied) - set(llama) == {
        f"model.layers.{i}.self_attn.{x}_norm.weight" for i in range(2) for x in "qk"
    }
    # every HF tensor appears exactly once
    assert len(untied) == len(set(untied)) == 2 + 2 * 11 + 1


def test_megatron_names_per_spec() -> None:
    s = _shape()
    local = {e.sharded_key("local") for e in mapping.entries(s)}
    te = {e.sharded_key("te") for e in mapping.entries(s)}
    assert "decoder.layers.input_layernorm.weight" in local
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in te
    assert mapping.detect_spec(sorted(te)) == "te" and mapping.detect_spec(sorted(local)) == "local"
    fwd, back = mapping.spec_key_map("local", "te"), mapping.spec_key_map("te", "local")
    assert {fwd[k] for k in local if k in fwd} | (local - set(fwd)) == te
    assert len(fwd) == 2 and all(back[fwd[k]] == k for k in fwd)
    assert mapping.spec_key_map("local", "local") == {}


def test_megatron_shapes() -> None:
    s = _shape(tie_word_embeddings=False)
    shapes = {e.megatron_name("local"): mapping.megatron_shape(e, s) for e in mapping.entries(s)}
    assert shapes["decoder.layers.0.self_attention.linear_qkv.weight"] == ((4 + 2 + 2) * 3, 8)
    assert shapes["decoder.layers.1.mlp.linear_fc1.weight"] == (24, 8)
    assert shapes["decoder.layers.1.mlp.linear_fc2.weight"] == (8, 12)
    assert shapes["decoder.layers.0.self_attention.q_layernorm.weight"] == (3,)
    assert shapes["output_layer.weight"] == (10, 8)


def test_unsupported_configs_are_named() -> None:
    with pytest.raises(ValueError, match=r"model_type='mistral'.*qwen3, llama"):
        _shape(model_type="mistral")
    with pytest.raises(ValueError, match="attention_bias"):
        _shape(attention_bias=True)
    with pytest.raises(ValueError, match="not a multiple"):
        _shape(num_key_value_heads=3)


def test_parse_dtype() -> None:
    assert io.parse_dtype("bf16") is torch.bfloat16
    assert io.parse_dtype("torch.float32") is torch.float32
    assert io.parse_dtype(None) is None
    with pytest.raises(ValueError, match=r"unsupported dtype 'int8'.*bf16"):
        io.parse_dtype("int8")
    with pytest.raises(ValueError, match="unsupported dtype"):
        io.parse_dtype(torch.int64)


def test_check_hf_tensors_names_every_problem() -> None:
    s = _shape()
    found = {n: (shp, "F32") for n, shp in mapping.expected_hf_shapes(s).items()}
    check_hf_tensors(s, found, "ok")  # the expected set passes
    del found["model.layers.1.mlp.up_proj.weight"]
    found["model.layers.0.self_attn.k_proj.weight"] = ((5, 8), "F32")
    found["model.layers.0.self_attn.q_proj.bias"] = ((12,), "F32")
    with pytest.raises(ValueError) as err:
        check_hf_tensors(s, found, "/some/dir")
    msg = str(err.value)
    assert "/some/dir" in msg
    assert "missing tensors (1): model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected tensors (1): model.layers.0.self_attn.q_proj.bias" in msg
    assert "model.layers.0.self_attn.k_proj.weight: expected [6, 8], got [5, 8]" in msg


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from rlrt_megatron.convert.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", seed=3)


def _digest(path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.iterdir())
        if p.is_file()
    }


def test_tiny_model_is_deterministic_and_loads_offline(tiny_dir, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlrt_megatron.convert.tiny import make_tiny_model

    again = make_tiny_model(tmp_path / "again", seed=3)
    other = make_tiny_model(tmp_path / "other", seed=4)
    assert _digest(again) == _digest(tiny_dir)
    assert _digest(other)["model.safetensors"] != _digest(tiny_dir)["model.safetensors"]

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (2, 64, 4)
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (2, 16, 128)
    assert cfg.vocab_size == 512 and len(tok) <= 512 and cfg.tie_word_embeddings
    assert tok.eos_token == "<|im_end|>" and cfg.eos_token_id == tok.eos_token_id
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 345?"}], tokenize=False,
        add_generation_prompt=True,
    )  # fmt: skip
    assert text == "<|im_start|>user\nWhat is 12 + 345?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    pieces = [tok.decode([i]) for i in ids]
    assert {"1", "2", "3", "4", "5", "<|im_start|>", "<|im_end|>"} <= set(pieces)
    # norms are randomised, so swapping two of them would change the model
    q_norm = model.model.layers[0].self_attn.q_norm.weight
    k_norm = model.model.layers[0].self_attn.k_norm.weight
    assert not torch.equal(q_norm, k_norm) and not torch.equal(q_norm, torch.ones_like(q_norm))
    meta = json.loads((tiny_dir / "rlrt_tiny.json").read_text())
    assert meta["seed"] == 3 and meta["arch"] == "qwen3"


def test_inspect_hf_dir_errors(tiny_dir, tmp_path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    shape, _ = inspect_hf_dir(tiny_dir)
    assert shape.tied and shape.qk_norm and shape.vocab_size == 512

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.self_attn.o_proj.weight"]
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors \(1\): model.layers.1.self_attn.o_proj"):
        inspect_hf_dir(bad)

    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture: model_type='gpt2'"):
        inspect_hf_dir(bad)
    with pytest.raises(FileNotFoundError, match="config.json"):
        inspect_hf_dir(tmp_path / "nowhere")


def test_rope_the_loader_refuses_is_refused_at_conversion(tmp_path) -> None:
    """A RoPE setting the model loader cannot build (here yarn) is refused by the converter with
    the loader's own message, before any work; llama3 scaling with any original context (4096
    here; megatron-core fixes 8192, `megatron/compat.py` rebuilds the frequencies) converts."""
    from rlrt_megatron.convert.hf_to_megatron import hf_to_megatron
    from rlrt_megatron.convert.tiny import make_tiny_model
    from rlrt_megatron.megatron.model import gpt_model_kwargs_from_hf

    llama = make_tiny_model(tmp_path / "llama", arch="llama", tied=False, seed=3)
    cfg = json.loads((llama / "config.json").read_text())
    key = "rope_parameters" if "rope_parameters" in cfg else "rope_scaling"
    cfg[key] = {**cfg[key], "original_max_position_embeddings": 4096}
    (llama / "config.json").write_text(json.dumps(cfg))
    shape, _ = inspect_hf_dir(llama)  # accepted
    assert shape.model_type == "llama"
    cfg[key] = {**cfg[key], "rope_type": "yarn", "type": "yarn"}
    (llama / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as loader:
        gpt_model_kwargs_from_hf(cfg)
    assert "'yarn'" in str(loader.value)
    with pytest.raises(ValueError) as converter:
        inspect_hf_dir(llama)
    assert str(converter.value) == f"{llama / 'config.json'}: {loader.value}"
    out = tmp_path / "megatron"
    with pytest.raises(ValueError, match="yarn"):
        hf_to_megatron(llama, out, show_progress=False)
    assert not out.exists()


@pytest.mark.parametrize("max_bytes", [10**9, 300])
def test_safetensors_stream_writer(tmp_path, max_bytes: int) -> None:
    from safetensors import safe_open

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=g).bfloat16(),
        "b": torch.randn(7, generator=g),
        "c.weight": torch.randn(2, 3, 4, generator=g).half(),
        "d": torch.randn(40, 2, generator=g),
    }
    plan = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    w = io.SafetensorsStreamWriter(tmp_path, plan, max_bytes)
    for k, v in tensors.items():
        w.add(k, v.t().contiguous().t() if v.dim() == 2 else v)  # non-contiguous input is fine
    files = w.finish()
    assert (len(files) == 1) == (max_bytes == 10**9)
    if len(files) > 1:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == sum(
            v.numel() * v.element_size() for v in tensors.values()
        )
    seen = {}
    for f in files:
        with safe_open(str(tmp_path / f), "pt") as st:
            assert st.metadata() == {"format": "pt"}
            seen.update({k: st.get_tensor(k) for k in st.keys()})  # noqa: SIM118
    assert sorted(seen) == sorted(tensors)
    assert all(seen[k].dtype == v.dtype and torch.equal(seen[k], v) for k, v in tensors.items())

    w = io.SafetensorsStreamWriter(tmp_path / "x", plan, max_bytes)
    with pytest.raises(ValueError, match="expected tensor"):
        w.add("b", tensors["b"])
    w = io.SafetensorsStreamWriter(tmp_path, plan, max_bytes)
    w.add("a", tensors["a"])
    with pytest.raises(ValueError, match="got 1 of 4 planned tensors; the next missing one is b"):
        w.finish()


def test_cli_reports_input_errors_in_one_line(tiny_dir, tmp_path, capsys) -> None:
    from rlrt_megatron.cli import main

    rc = main(["convert", "hf-to-megatron", "--hf", str(tmp_path / "no"), "--out", str(tmp_path)])
    assert rc == 2 and "no/config.json not found" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    rc = main(["convert", "hf-to-megatron", "--hf", str(tiny_dir), "--out", str(tmp_path / "busy")])
    assert rc == 2 and "not empty" in capsys.readouterr().err
    rc = main(["convert", "megatron-to-hf", "--ckpt", str(tiny_dir), "--out", str(tmp_path / "o")])
    assert rc == 2 and "not a Megatron dist checkpoint" in capsys.readouterr().err
    rc = main(["convert", "hf-to-megatron", "--hf", str(tiny_dir), "--out", "x", "--dtype", "q4"])
    assert rc == 2 and "unsupported dtype 'q4'" in capsys.readouterr().err


def test_resolve_dist_checkpoint_accepts_trainer_layouts(tmp_path):
    """`rlrt convert megatron-to-hf --ckpt` takes the dist dir, a trainer iter_N/ or its root."""
    from rlrt_megatron.convert.megatron_to_hf import resolve_dist_checkpoint

    dist = tmp_path / "checkpoints" / "iter_0000004" / "dist"
    dist.mkdir(parents=True)
    (dist / "metadata.json").write_text("{}")
    root = tmp_path / "checkpoints"
    (root / "latest").write_text("iter_0000004\n")
    for given in (dist, dist.parent, root):
        assert resolve_dist_checkpoint(given) == dist
    (root / "latest").write_text("iter_0000009")
    with pytest.raises(FileNotFoundError, match="iter_0000009"):
        resolve_dist_checkpoint(root)
    with pytest.raises(FileNotFoundError, match="not a Megatron dist checkpoint"):
        resolve_dist_checkpoint(tmp_path)
