"""`model.spec=torch` (megatron/attention.py) against the local spec on CPU, fp32, same weights.

Tiny Qwen3 (GQA 4 query heads / 2 kv heads, q/k RMSNorm) and Llama 3 (rope scaling): logits of
unpacked rows and of packed `thd` rows (per-sequence causal SDPA vs the local spec's dense
block-causal mask) within 1e-5, parameter grads, response log-probs through `megatron/forward.py`,
a Policy training step (fp32 and bf16), the converter (`hf_to_megatron(spec="torch")`, loaded
and compared with transformers' own forward) and `model.spec=auto` resolution.
"""

from __future__ import annotations

import json

import pytest
import torch

from rlrt_megatron.convert.tiny import tiny_config

VOCAB = 512


@pytest.fixture(scope="module")
def megatron_1proc():
    from dist_utils import single_process_megatron

    with single_process_megatron(seed=7):
        yield


def _pair(arch: str = "qwen3", dtype: torch.dtype = torch.float32):
    """(local model, torch-spec model) holding the same weights."""
    from rlrt_megatron.megatron.model import build_model

    hf = tiny_config(arch, vocab_size=VOCAB)
    local = build_model(hf, spec="local", params_dtype=dtype)[0]
    sdpa = build_model(hf, spec="torch", params_dtype=dtype)[0]
    with torch.no_grad():
        src = dict(local.named_parameters())
        for name, p in sdpa.named_parameters():
            p.copy_(src[name])
    return local.eval(), sdpa.eval()


def _thd(lens: list[int]):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
        max_seqlen_q=max(lens), max_seqlen_kv=max(lens),
    )  # fmt: skip


def test_same_parameter_names_and_params_dtype_norms(megatron_1proc):
    local, sdpa = _pair(dtype=torch.bfloat16)
    names = [n for n, _ in local.named_parameters()]
    assert names == [n for n, _ in sdpa.named_parameters()]
    assert "decoder.layers.0.self_attention.q_layernorm.weight" in names
    assert "decoder.final_layernorm.weight" in names
    assert {p.dtype for p in sdpa.parameters()} == {torch.bfloat16}  # norms created in bf16
    attn = sdpa.decoder.layers[0].self_attention
    assert type(attn).__name__ == "SDPASelfAttention"
    core = attn.core_attention
    assert type(core).__name__ == "SDPAttention" and (core.heads, core.groups) == (4, 2)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_unpacked_logits_match_local(megatron_1proc, arch):
    local, sdpa = _pair(arch)
    ids = torch.randint(0, VOCAB, (3, 21), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(21).expand(3, -1)
    with torch.no_grad():
        ref = local(ids, pos, attention_mask=None)
        out = sdpa(ids, pos, attention_mask=None)
    assert out.shape == ref.shape == (3, 21, 512)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_packed_thd_logits_match_local_block_mask(megatron_1proc):
    from rlrt_megatron.megatron.packing import block_causal_mask

    local, sdpa = _pair()
    lens = [9, 7, 1, 5, 2]  # the last segment plays the row's padding
    ids = torch.randint(0, VOCAB, (1, sum(lens)), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    with torch.no_grad():
        mask = block_causal_mask(lens[:-1], sum(lens))[None, None]
        ref = local(ids, pos, attention_mask=mask)
        out = sdpa(ids, pos, attention_mask=None, packed_seq_params=_thd(lens))
        # an empty segment in cu_seqlens changes nothing
        empty = sdpa(ids, pos, attention_mask=None, packed_seq_params=_thd([9, 0, 7, 1, 5, 2]))
        torch.testing.assert_close(empty, out, atol=0, rtol=0)
        # each sequence alone gives the same logits: nothing leaks between packed sequences
        alone = torch.cat(
            [sdpa(x, torch.arange(x.shape[1])[None], attention_mask=None)
             for x in ids.split(lens, dim=1)], dim=1,
        )  # fmt: skip
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=0)


def test_packed_thd_grads_match_local(megatron_1proc):
    from rlrt_megatron.megatron.packing import block_causal_mask

    local, sdpa = _pair()
    lens = [6, 10, 4]
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (1, 20), generator=g)
    w = torch.randn(1, 20, 512, generator=g)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    (local(ids, pos, attention_mask=block_causal_mask(lens, 20)[None, None]) * w).sum().backward()
    (sdpa(ids, pos, attention_mask=None, packed_seq_params=_thd(lens)) * w).sum().backward()
    grads = dict(local.named_parameters())
    for name, p in sdpa.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_sdpa_gqa_paths_and_mask_agree():
    from rlrt_megatron.megatron.attention import sdpa

    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 7, 8, generator=g)
    k, v = torch.randn(2, 2, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)
    expand = sdpa(q, k, v, scale=0.3, native_gqa=False)
    native = sdpa(q, k, v, scale=0.3, native_gqa=True)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    masked = sdpa(q, k, v, scale=0.3, mask=causal)
    # reference: query head h reads kv head h // 2 (megatron's linear_qkv grouping)
    kk, vv = k[:, [0, 0, 1, 1]], v[:, [0, 0, 1, 1]]
    scores = (q @ kk.transpose(-1, -2) * 0.3).masked_fill(~causal, float("-inf"))
    ref = scores.softmax(-1) @ vv
    for out in (expand, native, masked):
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_cu_seqlens_read_once_per_micro_batch():
    from rlrt_megatron.megatron.attention import host_packed_seq_params, packed_seqlens

    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    first = packed_seqlens(cu)
    assert first == [3, 5] and packed_seqlens(cu) is first  # cached
    cu[2] = 9  # in-place change: recomputed
    assert packed_seqlens(cu) == [3, 6]
    psp = _thd([4, 2])
    host = host_packed_seq_params(psp)
    assert host_packed_seq_params(psp) is host  # every layer gets the same host copy
    assert host.cu_seqlens_q is host.cu_seqlens_kv and host.cu_seqlens_q.device.type == "cpu"
    assert host.cu_seqlens_q.tolist() == [0, 4, 6] and host.max_seqlen_q == 4


def _rollouts():
    g = torch.Generator().manual_seed(4)
    shapes = [(5, 7), (12, 3), (3, 9), (8, 1), (6, 6)]
    seqs = [torch.randint(0, VOCAB, (p + r,), generator=g).tolist() for p, r in shapes]
    return seqs, [p for p, _ in shapes]


def test_response_logprobs_match_local(megatron_1proc):
    from rlrt_megatron.megatron.forward import _attention_layout, compute_response_logprobs

    local, sdpa = _pair()
    assert _attention_layout(local, "auto") == "mask"
    assert _attention_layout(sdpa, "auto") == "thd"
    seqs, starts = _rollouts()
    kw = dict(token_budget=32, with_entropy=True)
    ref = compute_response_logprobs([local], seqs, starts, rows_per_microbatch=2, **kw)
    thd = compute_response_logprobs([sdpa], seqs, starts, **kw)  # auto: packed thd rows
    mask = compute_response_logprobs(
        [sdpa], seqs, starts, rows_per_microbatch=2, attention="mask", **kw
    )
    assert torch.equal(thd.mask, ref.mask)
    for out in (thd, mask):
        torch.testing.assert_close(out.logprobs, ref.logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.entropy, ref.entropy, atol=1e-5, rtol=0)


def _policy(spec: str, dtype: torch.dtype):
    from rlrt_megatron import platform
    from rlrt_megatron.config import OptimizerConfig
    from rlrt_megatron.megatron.train_step import Policy

    platform.init_distributed(tp=1, pp=1)
    torch.manual_seed(11)  # CPU initialisation draws from the default generator: same weights
    return Policy(
        tiny_config(vocab_size=VOCAB), tp=1, pp=1, optim=OptimizerConfig(lr=1e-2),
        total_steps=4, spec=spec, params_dtype=dtype,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_train_step_torch_spec(megatron_1proc, dtype):
    seqs, starts = _rollouts()
    width = max(len(s) - r for s, r in zip(seqs, starts, strict=True))
    n_tokens = sum(len(s) - r for s, r in zip(seqs, starts, strict=True))

    def loss_of(lp, rows, tk):
        return -lp.sum() / n_tokens, {}

    results = {}
    for spec in ("local", "torch"):
        policy = _policy(spec, dtype)
        assert policy._layout(20, 32) == ((32, 1) if spec == "torch" else (20, 1))
        before = {n: p.detach().clone() for n, p in policy.chunks[0].named_parameters()}
        first = policy.train_minibatch(seqs, starts, list(range(len(seqs))), width, 32, loss_of)
        second = policy.train_minibatch(seqs, starts, list(range(len(seqs))), width, 32, loss_of)
        after = dict(policy.chunks[0].named_parameters())
        assert all(not torch.equal(after[n], p) for n, p in before.items()), "params unchanged"
        assert second["loss"] < first["loss"]
        results[spec] = (before, first)
    (b_local, f_local), (b_torch, f_torch) = results["local"], results["torch"]
    for name, p in b_torch.items():
        assert torch.equal(p.float(), b_local[name].float()), name
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(f_torch["loss"] - f_local["loss"]) < tol * max(1.0, abs(f_local["loss"]))
    assert abs(f_torch["grad_norm"] - f_local["grad_norm"]) < 50 * tol * f_local["grad_norm"]


def test_resolve_spec(monkeypatch):
    from rlrt_megatron import platform
    from rlrt_megatron.megatron import model, te

    monkeypatch.setattr(platform, "is_cpu_mode", lambda: True)
    assert model.resolve_spec("auto") == "local"
    monkeypatch.setattr(platform, "is_cpu_mode", lambda: False)
    monkeypatch.setattr(te, "te_available", lambda: False)
    assert model.resolve_spec("auto") == "torch"
    monkeypatch.setattr(te, "te_available", lambda: True)
    assert model.resolve_spec("auto") == "te"
    assert model.resolve_spec("torch") == "torch"
    with pytest.raises(ValueError, match="model.spec must be one of auto, local, torch, te"):
        model.resolve_spec("fast")


def test_config_spec_values():
    from recipes import get_recipe
    from rlrt_megatron.config import ConfigError, TrainConfig

    assert TrainConfig().model.spec == "auto"
    for spec in ("auto", "local", "torch", "te"):
        assert get_recipe("tiny_demo", [f"model.spec={spec}"]).model.spec == spec
    with pytest.raises(ConfigError, match=r"model\.spec"):
        get_recipe("tiny_demo", ["model.spec=fast"])
    with pytest.raises(ConfigError, match=r"model\.fp8\.enabled"):
        get_recipe("tiny_demo", ["model.spec=torch", "model.fp8.enabled=true"])


def test_convert_for_torch_spec_loads_and_matches_transformers(megatron_1proc, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlrt_megatron.convert.hf_to_megatron import hf_to_megatron
    from rlrt_megatron.convert.load import load_checkpoint_into_model
    from rlrt_megatron.convert.tiny import make_tiny_model
    from rlrt_megatron.megatron.model import build_model

    hf_dir = make_tiny_model(tmp_path / "hf", seed=3)
    ckpt = hf_to_megatron(hf_dir, tmp_path / "meg", spec="torch", show_progress=False)
    assert json.loads((ckpt / "rlrt_meta.json").read_text())["spec"] == "torch"
    auto = hf_to_megatron(hf_dir, tmp_path / "auto", spec="auto", show_progress=False)
    assert json.loads((auto / "rlrt_meta.json").read_text())["spec"] == "local"  # CPU
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    model = build_model(hf.config, spec="torch")[0].eval()
    load_checkpoint_into_model([model], ckpt)
    lens = [11, 6]
    ids = torch.randint(
        0, hf.config.vocab_size, (1, 17), generator=torch.Generator().manual_seed(5)
    )
    with torch.no_grad():
        out = model(ids, None, attention_mask=None, packed_seq_params=_thd(lens))
        out = out[..., : hf.config.vocab_size]
        ref = torch.cat([hf(x).logits for x in ids.split(lens, dim=1)], dim=1)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_rotary_matches_megatron_and_gradcheck():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from rlrt_megatron.megatron.attention import _Rotary, rope_tables

    g = torch.Generator().manual_seed(6)
    freqs = torch.randn(9, 1, 1, 8, generator=g, dtype=torch.float64)
    x = torch.randn(9, 2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_tables(freqs, None, None, torch.float64)
    assert torch.equal(_Rotary.apply(x, cos, sin), _apply_rotary_pos_emb_bshd(x, freqs))
    assert torch.autograd.gradcheck(_Rotary.apply, (x, cos, sin))
    # thd: each packed token rotates by its position within its own sequence
    lens = [5, 4]
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    cos_t, sin_t = rope_tables(freqs, lens, cu, torch.float64)
    pos = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3])
    torch.testing.assert_close(cos_t, torch.cos(freqs[pos, 0]), rtol=0, atol=0)
    assert rope_tables(freqs, lens, cu, torch.float64)[0] is cos_t  # once per micro-batch


def test_torch_spec_applies_rope_itself(megatron_1proc, monkeypatch):
    """Megatron's per-layer RoPE is bypassed (the core attention rotates q/k), also under
    selective recomputation of the core attention."""
    import megatron.core.transformer.attention as mattn

    from rlrt_megatron.megatron.model import build_model

    hf = tiny_config(vocab_size=VOCAB)
    plain = build_model(hf, spec="torch")[0]
    recompute = build_model(
        hf, spec="torch", recompute_granularity="selective", recompute_modules=["core_attn"]
    )[0]
    assert recompute.decoder.layers[0].self_attention.checkpoint_core_attention
    recompute.load_state_dict(plain.state_dict())

    def boom(*a, **k):
        raise AssertionError("megatron's RoPE ran")

    monkeypatch.setattr(mattn, "apply_rotary_pos_emb", boom)
    lens = [7, 9]
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (1, 16), generator=g)
    w = torch.randn(1, 16, 512, generator=g)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    for m in (plain, recompute):
        (m(ids, pos, attention_mask=None, packed_seq_params=_thd(lens)) * w).sum().backward()
        (m(ids[:, :7], pos[:, :7], attention_mask=None) * w[:, :7]).sum().backward()
    ref = dict(plain.named_parameters())
    for name, p in recompute.named_parameters():
        torch.testing.assert_close(p.grad, ref[name].grad, atol=1e-6, rtol=1e-5, msg=name)


def test_policy_response_logprobs_torch_spec(megatron_1proc):
    """The logprobs phase (student + teacher views, top-k) agrees between the specs."""
    seqs, starts = _rollouts()
    prompts = [s[:r] for s, r in zip(seqs, starts, strict=True)]
    responses = [s[r:] for s, r in zip(seqs, starts, strict=True)]
    prefixes = [[1, 2, 3] + p if i % 2 else None for i, p in enumerate(prompts)]
    out = {}
    for spec in ("local", "torch"):
        policy = _policy(spec, torch.float32)
        out[spec] = policy.response_logprobs(prompts, responses, prefixes, token_budget=32, topk=4)
    for view in (0, 1):
        ref, got = out["local"][view], out["torch"][view]
        assert torch.equal(got.mask, ref.mask)
        for name in ("logprobs", "entropy", "topk_logprobs"):
            torch.testing.assert_close(getattr(got, name), getattr(ref, name), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_load_weights_then_step_keeps_loaded_weights(megatron_1proc, tmp_path, dtype):
    """A bf16 policy's fp32 main params follow the loaded checkpoint: one small step moves the
    weights a little from the LOADED ones (not back to the random init the optimizer was built
    from, which collapsed every bf16 run after its first update)."""
    from rlrt_megatron.convert.hf_to_megatron import hf_to_megatron
    from rlrt_megatron.convert.load import load_checkpoint_into_model
    from rlrt_megatron.convert.tiny import make_tiny_model

    hf_dir = make_tiny_model(tmp_path / "hf", seed=3, vocab_size=VOCAB)
    ckpt = hf_to_megatron(hf_dir, tmp_path / "meg", spec="local", show_progress=False)
    policy = _policy("local", dtype)
    init = {n: p.detach().clone() for n, p in policy.chunks[0].named_parameters()}
    load_checkpoint_into_model(policy.chunks, str(ckpt))
    policy.sync_main_params()
    loaded = {n: p.detach().clone() for n, p in policy.chunks[0].named_parameters()}
    seqs, starts = _rollouts()
    width = max(len(s) - r for s, r in zip(seqs, starts, strict=True))
    policy.scheduler.step(0)
    for g in policy.optimizer.param_groups:
        g["lr"] = 1e-6
    policy.train_minibatch(
        seqs, starts, list(range(len(seqs))), width, 32, lambda lp, rows, tk: (-lp.mean(), {})
    )
    for n, p in policy.chunks[0].named_parameters():
        to_loaded = (p.float() - loaded[n].float()).abs().max().item()
        to_init = (p.float() - init[n].float()).abs().max().item()
        assert to_loaded < 1e-2 and to_loaded < to_init, (n, to_loaded, to_init)


def test_ema_teacher_of_a_bf16_policy_accumulates_in_fp32(megatron_1proc):
    """One EMA step of rate 0.05 towards a student one bf16 ulp away moves an fp32 teacher; a
    bf16 teacher rounds such updates away."""
    policy = _policy("local", torch.bfloat16)
    teachers = {"fp32": policy.make_teacher_copy(torch.float32), "bf16": policy.make_teacher_copy()}
    assert {p.dtype for p in teachers["fp32"][0].parameters()} == {torch.float32}
    before = {k: [p.detach().clone() for p in t[0].parameters()] for k, t in teachers.items()}
    with torch.no_grad():
        for p in policy.chunks[0].parameters():
            p.add_(torch.finfo(torch.bfloat16).eps * p.abs().clamp_min(1e-3))
    moved = {}
    for k, t in teachers.items():
        policy.ema_into(t, 0.05)
        pairs = list(zip(before[k], t[0].parameters(), strict=True))
        changed = sum(int((a != b).sum()) for a, b in pairs)
        moved[k] = changed / sum(a.numel() for a, _ in pairs)  # share of weights that moved
    assert moved["fp32"] > 0.99 and moved["bf16"] < 0.1, moved
