"""GPU: the `torch` layer spec (megatron/attention.py) in bf16 runs on SDPA's flash / efficient
kernels (never the math fallback) and stays close to the fp32 local spec with the same weights.

    python -m pytest -q -m gpu tests/gpu/test_torch_spec_gpu.py

Every SDPA call here runs under `sdpa_kernel([FLASH_ATTENTION, EFFICIENT_ATTENTION])`: a call
those kernels cannot take raises instead of silently using the math kernel. Tolerances: bf16 vs
fp32 differ by bf16 rounding through 2 layers: max |diff| <= 5% of the logits' scale and cosine
similarity >= 0.999 (the bar of tests/gpu/test_te_spec.py).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

VOCAB = 512


@pytest.fixture(scope="module")
def megatron_1gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from dist_utils import single_process_megatron

    with single_process_megatron(seed=3):
        yield


def _fast_sdpa_only():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def _thd(lens: list[int]):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
        max_seqlen_q=max(lens), max_seqlen_kv=max(lens),
    )  # fmt: skip


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    out, ref = out.float(), ref.float()
    scale = ref.abs().max()
    assert (out - ref).abs().max() <= 0.05 * scale, ((out - ref).abs().max(), scale)
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos >= 0.999, cos


def test_bf16_torch_spec_close_to_fp32_local(megatron_1gpu):
    from rlrt_megatron.convert.tiny import tiny_config
    from rlrt_megatron.megatron.model import build_model
    from rlrt_megatron.megatron.packing import block_causal_mask

    hf = tiny_config(vocab_size=VOCAB)
    local = build_model(hf, spec="local", params_dtype=torch.float32)[0].eval()
    fast = build_model(hf, spec="torch", params_dtype=torch.bfloat16)[0].eval()
    assert {p.dtype for p in fast.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        src = dict(local.named_parameters())
        for name, p in fast.named_parameters():
            p.copy_(src[name])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 96), generator=g).cuda()
    pos = torch.arange(96, device="cuda").expand(2, -1)
    lens = [40, 31, 25]
    packed_pos = torch.cat([torch.arange(n) for n in lens])[None].cuda()
    mask = block_causal_mask(lens, 96)[None, None].cuda()
    with torch.no_grad(), _fast_sdpa_only():
        _close(fast(ids, pos, attention_mask=None), local(ids, pos, attention_mask=None))
        _close(
            fast(ids[:1], packed_pos, attention_mask=None, packed_seq_params=_thd(lens)),
            local(ids[:1], packed_pos, attention_mask=mask),
        )


def test_core_attention_fwd_bwd_on_flash_qwen3_shape(megatron_1gpu):
    """Qwen3-0.6B attention shape (16 query / 8 kv heads, head_dim 128), 4096 packed tokens,
    bf16: forward + backward on the flash kernel with grouped kv heads (no expansion, no math
    fallback); memory stays far below one [heads, s, s] matrix."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from rlrt_megatron.megatron.attention import SDPAttention, flash_takes_gqa

    assert flash_takes_gqa(torch.device("cuda", 0), torch.bfloat16, 16, 8, 128), (
        "SDPA flash does not take enable_gqa here: the torch spec expands kv heads (slower)"
    )
    cfg = TransformerConfig(
        num_layers=1, hidden_size=1024, num_attention_heads=16, num_query_groups=8,
        kv_channels=128, params_dtype=torch.bfloat16, bf16=True,
    )  # fmt: skip
    core = SDPAttention(cfg, 1, AttnMaskType.causal, "self")
    lens = [1000, 2900, 196]
    t = sum(lens)
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(t, 16, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    kv = torch.randn(t, 2, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    q.requires_grad_()
    kv.requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        # kv[:, 0] / kv[:, 1]: strided views, like megatron's split of the fused qkv
        out = core(q, kv[:, 0], kv[:, 1], None, packed_seq_params=_thd(lens))
        (out * out).sum().backward()
    torch.cuda.synchronize()
    assert out.shape == (t, 16 * 128) and torch.isfinite(q.grad).all()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 16 * 2900 * 2900 * 2, f"{extra / 2**20:.0f} MiB: an [h, s, s] matrix?"
    # the packed call equals attending to the first sequence alone
    with torch.no_grad(), _fast_sdpa_only():
        alone = core(q[:1000], kv[:1000, 0], kv[:1000, 1], None, packed_seq_params=_thd([1000]))
        torch.testing.assert_close(out[:1000].detach(), alone, atol=2e-2, rtol=2e-2)


def test_policy_bf16_train_step_on_gpu(megatron_1gpu):
    from rlrt_megatron.config import OptimizerConfig
    from rlrt_megatron.convert.tiny import tiny_config
    from rlrt_megatron.megatron.model import resolve_spec
    from rlrt_megatron.megatron.te import te_available
    from rlrt_megatron.megatron.train_step import Policy

    assert resolve_spec("auto") == ("te" if te_available() else "torch")
    policy = Policy(
        tiny_config(vocab_size=VOCAB), tp=1, pp=1, optim=OptimizerConfig(lr=1e-2),
        total_steps=4, spec="torch", params_dtype=torch.bfloat16,
    )  # fmt: skip
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (70, 33, 50, 20)]
    starts = [10, 5, 30, 2]
    width = max(len(s) - r for s, r in zip(seqs, starts, strict=True))
    n_tok = sum(len(s) - r for s, r in zip(seqs, starts, strict=True))
    assert policy._layout(70, 128) == (128, 1)  # packed thd rows

    def loss_of(lp, rows, tk):
        return -lp.sum() / n_tok, {}

    with _fast_sdpa_only():
        first = policy.train_minibatch(seqs, starts, [0, 1, 2, 3], width, 128, loss_of)
        second = policy.train_minibatch(seqs, starts, [0, 1, 2, 3], width, 128, loss_of)
    assert first["update_ok"] == 1.0 and second["loss"] < first["loss"]
