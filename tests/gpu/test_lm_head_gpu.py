"""The fused (Triton) LM head + log-probs on CUDA vs the chunked torch path and naive fp32.

    pytest -q tests/gpu/test_lm_head_gpu.py

Values, entropy and gradients of hidden and weight: fp32 inputs within 1e-4 of the naive fp32
computation (TF32 is off here), bf16 inputs within 2e-2 of an fp32 reference computed from the
same bf16 numbers; log-probs never positive, including at a 262,144-token vocabulary; at-ids and
top-k on CUDA; a peak-memory bound at a realistic size (no [T, V] tensor).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

from rlrt_megatron.megatron.lm_head import (  # noqa: E402
    lm_head_logprobs,
    lm_head_logprobs_at_ids,
    lm_head_topk,
    resolve_impl,
)

DEV = torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _inputs(n, h, v, v_true, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, device=DEV)
    weight = torch.randn(v, h, generator=g, device=DEV) * (2 / h**0.5)
    weight[v_true:] = hidden.mean(0) * 4  # padding rows would dominate if they leaked in
    target = torch.randint(0, v_true, (n,), generator=g, device=DEV)
    return hidden.to(dtype), weight.to(dtype), target


def _naive(hidden, weight, target, v_true):
    lsm = torch.log_softmax((hidden.float() @ weight.float().t())[:, :v_true], -1)
    return lsm.gather(-1, target[:, None])[:, 0], -(lsm.exp() * lsm).sum(-1)


def _naive_lowp_logits(hidden, weight, target, v_true):
    """log_softmax of the logits in the inputs' dtype (what a bf16 LM head produces), in fp32."""
    lsm = torch.log_softmax((hidden @ weight.t())[:, :v_true].float(), -1)
    return lsm.gather(-1, target[:, None])[:, 0], -(lsm.exp() * lsm).sum(-1)


def _run(fn, hidden, weight, *args, **kw):
    a, b = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    lp, ent = fn(a, b, *args, **kw)
    g = torch.Generator(device=DEV).manual_seed(1)
    g_lp = torch.randn(lp.shape, generator=g, device=DEV)
    g_h = torch.randn(lp.shape, generator=g, device=DEV)
    (lp * g_lp + ent * g_h).sum().backward()
    return lp.detach(), ent.detach(), a.grad.float(), b.grad.float()


def test_auto_is_fused_on_cuda():
    assert resolve_impl("auto", DEV) == "fused"


@pytest.mark.parametrize(
    "dtype,tol,n,h,v,v_true,chunk",
    [
        (torch.float32, 1e-4, 300, 64, 20_480, 20_000, None),
        (torch.float32, 1e-4, 300, 64, 20_480, 20_000, 37),  # ragged token chunks
        (torch.bfloat16, 2e-2, 1000, 256, 50_304, 50_257, None),
    ],
)
def test_fused_matches_chunked_and_naive(dtype, tol, n, h, v, v_true, chunk):
    hidden, weight, target = _inputs(n, h, v, v_true, dtype)
    kw = dict(with_entropy=True, true_vocab_size=v_true, chunk_size=chunk)
    fused = _run(lm_head_logprobs, hidden, weight, target, impl="fused", **kw)
    chunked = _run(lm_head_logprobs, hidden, weight, target, impl="chunked", **kw)
    # the fp32 reference from the same (possibly bf16) numbers
    ref = _run(lambda a, b: _naive(a, b, target, v_true), hidden.float(), weight.float())
    # bf16: the LM head's logits (and their gradient) are bf16 numbers whatever the log-probs
    # code does, so gradients are compared with the naive computation on the same bf16 logits
    # (and only in norm with fp32); values with fp32 directly.
    grad_ref = ref
    if dtype != torch.float32:
        grad_ref = _run(lambda a, b: _naive_lowp_logits(a, b, target, v_true), hidden, weight)
        for x, r in zip(fused[2:], ref[2:], strict=True):
            assert (x - r).norm() <= 1e-2 * r.norm()
    names = ("logp", "entropy", "grad hidden", "grad weight")
    for i, (name, x, y) in enumerate(zip(names, fused, chunked, strict=True)):
        r = ref[i] if i < 2 else grad_ref[i]
        torch.testing.assert_close(x, r, atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(x, y, atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")
    assert torch.all(fused[0] <= 0) and torch.all(fused[1] >= 0)
    assert torch.all(fused[3][v_true:] == 0)


def test_no_grad_forward_and_at_ids_topk():
    hidden, weight, target = _inputs(200, 128, 32_768, 32_000, torch.bfloat16, seed=3)
    with torch.no_grad():
        lp = lm_head_logprobs(hidden, weight, target, true_vocab_size=32_000, impl="fused")
    ref = _naive(hidden, weight, target, 32_000)[0]
    torch.testing.assert_close(lp, ref, atol=2e-2, rtol=2e-2)
    ids = lm_head_topk(hidden, weight, 20, true_vocab_size=32_000)
    z = (hidden.float() @ weight.float().t())[:, :32_000]
    top = z.topk(20, -1).values
    # bf16 logits: ties / rounding may reorder near-equal ids; the values must match
    torch.testing.assert_close(z.gather(1, ids), top, atol=5e-2, rtol=0)
    a = hidden.clone().requires_grad_()
    out = lm_head_logprobs_at_ids(a, weight, ids, true_vocab_size=32_000)
    out.sum().backward()
    lsm = torch.log_softmax(z, -1)
    torch.testing.assert_close(out[:, :20], lsm.gather(1, ids), atol=2e-2, rtol=2e-2)
    assert torch.all(out <= 0) and torch.isfinite(a.grad).all()


def test_logprobs_never_positive_at_262k_vocab_bf16():
    v, n, h = 262_144, 512, 256
    hidden, weight, target = _inputs(n, h, v, v, torch.bfloat16, seed=4)
    weight[target] = (hidden.float() * 0.5).to(torch.bfloat16)  # p(target) ~ 1
    lp, ent = lm_head_logprobs(hidden, weight, target, with_entropy=True, impl="fused")
    assert torch.all(lp <= 0) and torch.all(ent >= 0)
    ref, ref_ent = _naive(hidden, weight, target, v)
    torch.testing.assert_close(lp, ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ent, ref_ent, atol=2e-2, rtol=2e-2)


def test_peak_memory_is_bounded():
    """T=8192, H=4096, V=151,936 bf16: forward <= 64 MiB above the inputs (naive: ~9 GiB);
    forward+backward <= the two gradients + 256 MiB."""
    t, h, v = 8192, 4096, 151_936
    hidden, weight, target = _inputs(t, h, v, v, torch.bfloat16, seed=5)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        lp = lm_head_logprobs(hidden, weight, target, with_entropy=True, impl="fused")
    torch.cuda.synchronize()
    fwd_peak = torch.cuda.max_memory_allocated() - base
    assert fwd_peak <= 64 * 2**20, fwd_peak / 2**20
    del lp
    a, b = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    lm_head_logprobs(a, b, target, impl="fused").sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grads = a.numel() * 2 + b.numel() * 2
    assert peak <= grads + 256 * 2**20, (peak - grads) / 2**20
