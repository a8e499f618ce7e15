"""Single-process checks of megatron/lm_head.py (log-probs from hidden states) vs naive fp32.

The naive reference is `log_softmax(hidden.float() @ weight.float().T)` over the true vocabulary.
The Triton kernels are checked here too, on CPU through Triton's interpreter (triton is in the
dev extra); `tests/gpu/test_lm_head_gpu.py` runs them compiled on CUDA.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from rlrt_megatron.megatron import lm_head
from rlrt_megatron.megatron.lm_head import lm_head_logprobs
from rlrt_megatron.megatron.lm_head_ids import lm_head_logprobs_at_ids, lm_head_topk
from rlrt_megatron.megatron.logprobs import (
    vocab_parallel_logprobs_at_ids,
    vocab_parallel_topk_ids,
)

V_TRUE, V_PAD, H = 1001, 1024, 24  # 1001: not a multiple of 128 (or of any TP size)


def make_inputs(n: int, dtype=torch.float32, seed: int = 0, v_true: int = V_TRUE):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g)
    weight = torch.randn(V_PAD, H, generator=g) * 0.5
    # Padding rows aligned with the hidden states: they would dominate every softmax / top-k.
    weight[v_true:] = hidden.mean(0) * 4
    target = torch.randint(0, v_true, (n,), generator=g)
    return hidden.to(dtype), weight.to(dtype), target


def naive(hidden, weight, target, v_true=V_TRUE):
    lsm = torch.log_softmax((hidden.float() @ weight.float().t())[..., :v_true], -1)
    return lsm.gather(-1, target[..., None]).squeeze(-1), -(lsm.exp() * lsm).sum(-1)


def _run(fn, hidden, weight, *args, g=None, **kw):
    a, b = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fn(a, b, *args, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    g = g if g is not None else [torch.randn(o.shape, generator=torch.Generator().manual_seed(i))
                                 for i, o in enumerate(outs)]  # fmt: skip
    sum((o * gi).sum() for o, gi in zip(outs, g, strict=True)).backward()
    return [o.detach() for o in outs], a.grad, b.grad


@pytest.mark.parametrize(
    "dtype,tol,chunk",
    [(torch.float32, 1e-5, None), (torch.float32, 1e-5, 5), (torch.bfloat16, 2e-2, 7)],
)
def test_logprobs_entropy_and_grads_match_naive(dtype, tol, chunk):
    h, w, tgt = make_inputs(23, dtype)
    (lp, ent), gh, gw = _run(
        lm_head_logprobs, h, w, tgt, with_entropy=True, true_vocab_size=V_TRUE,
        chunk_size=chunk, impl="chunked",
    )  # fmt: skip
    (lp_r, ent_r), gh_r, gw_r = _run(lambda a, b: naive(a, b, tgt), h.float(), w.float())
    assert lp.dtype == torch.float32 and lp.shape == (23,)
    torch.testing.assert_close(lp, lp_r, atol=tol, rtol=tol)
    torch.testing.assert_close(ent, ent_r, atol=tol, rtol=tol)
    assert gh.dtype == dtype and gw.dtype == dtype
    torch.testing.assert_close(gh.float(), gh_r, atol=tol, rtol=tol)
    torch.testing.assert_close(gw.float(), gw_r, atol=tol, rtol=tol)
    assert torch.all(gw[V_TRUE:] == 0)
    assert torch.all(lp <= 0)


def test_leading_dims_no_entropy_and_no_grad_paths():
    h, w, tgt = make_inputs(12)
    lp = lm_head_logprobs(h.view(3, 4, H), w, tgt.view(3, 4), true_vocab_size=V_TRUE)
    assert lp.shape == (3, 4)
    torch.testing.assert_close(lp.view(-1), naive(h, w, tgt)[0], atol=1e-5, rtol=1e-5)
    # grad only to the hidden states (frozen weight) and only to the weight
    a = h.clone().requires_grad_()
    lm_head_logprobs(a, w, tgt, true_vocab_size=V_TRUE).sum().backward()
    b = w.clone().requires_grad_()
    lm_head_logprobs(h, b, tgt, true_vocab_size=V_TRUE).sum().backward()
    (lp_r, _), gh_r, gw_r = _run(
        lambda x, y: naive(x, y, tgt), h, w, g=[torch.ones(12), torch.zeros(12)]
    )
    torch.testing.assert_close(a.grad, gh_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.grad, gw_r, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="true vocabulary"):
        lm_head_logprobs(h, w, torch.full_like(tgt, V_TRUE), true_vocab_size=V_TRUE)
    with pytest.raises(ValueError, match="impl"):
        lm_head_logprobs(h, w, tgt, impl="fast")


def test_at_ids_and_topk_match_naive_and_logits_api():
    h, w, _ = make_inputs(19)
    k = 9
    ids = lm_head_topk(h, w, k, true_vocab_size=V_TRUE, chunk_size=4)
    z = h @ w.t()
    assert torch.equal(ids, z[:, :V_TRUE].topk(k, -1).indices)
    assert torch.equal(ids, vocab_parallel_topk_ids(z, k, true_vocab_size=V_TRUE))
    assert torch.all(ids < V_TRUE)  # padding rows (the largest logits) never win
    g = [torch.randn(19, k + 1, generator=torch.Generator().manual_seed(3))]
    (out,), gh, gw = _run(
        lm_head_logprobs_at_ids, h, w, ids, true_vocab_size=V_TRUE, chunk_size=5, g=g
    )
    (ref,), gh_r, gw_r = _run(
        lm_head_logprobs_at_ids, h, w, ids, true_vocab_size=V_TRUE, impl="naive", g=g
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh, gh_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, gw_r, atol=1e-5, rtol=1e-5)
    assert torch.all(gw[V_TRUE:] == 0) and torch.all(out <= 0)
    # the logits API's semantics (tail bucket last)
    lg = vocab_parallel_logprobs_at_ids(z, ids, true_vocab_size=V_TRUE)
    torch.testing.assert_close(out, lg, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["chunked", "naive"])
def test_temperature_divides_the_logits(impl):
    """softmax(z / T): log-probs, entropy, log-probs at ids and every gradient equal the naive
    computation on z / T (the engine's sampling distribution at T = 0.7); T = 1 is the default."""
    t = 0.7
    h, w, tgt = make_inputs(23)
    (lp, ent), gh, gw = _run(
        lm_head_logprobs, h, w, tgt, with_entropy=True, true_vocab_size=V_TRUE, chunk_size=5,
        impl=impl, temperature=t,
    )  # fmt: skip
    (lp_r, ent_r), gh_r, gw_r = _run(lambda a, b: naive(a / t, b, tgt), h, w)
    for x, y in ((lp, lp_r), (ent, ent_r), (gh, gh_r), (gw, gw_r)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert (lp - naive(h, w, tgt)[0]).abs().max() > 0.1  # T = 0.7 is not T = 1
    ids = lm_head_topk(h, w, 9, true_vocab_size=V_TRUE, chunk_size=4)
    g = [torch.randn(23, 10, generator=torch.Generator().manual_seed(3))]
    (out,), gh, gw = _run(
        lm_head_logprobs_at_ids, h, w, ids, true_vocab_size=V_TRUE, chunk_size=5, g=g,
        impl=impl, temperature=t,
    )  # fmt: skip
    (ref,), gh_r, gw_r = _run(
        lambda a, b: vocab_parallel_logprobs_at_ids(a @ b.t() / t, ids, true_vocab_size=V_TRUE),
        h, w, g=g,
    )  # fmt: skip
    for x, y in ((out, ref), (gh, gh_r), (gw, gw_r)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        lm_head_logprobs(h, w, tgt, temperature=0.0)


def test_logprobs_never_positive_at_262k_vocab_bf16():
    v, n, hh = 262_144, 16, 32
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(n, hh, generator=g).to(torch.bfloat16)
    weight = (torch.randn(v, hh, generator=g) * 0.02).to(torch.bfloat16)
    target = torch.randint(0, v, (n,), generator=g)
    # make each target dominate (p ~ 1): where a lossy lse would give logp > 0
    weight[target] = (hidden * 8).to(torch.bfloat16)
    lp, ent = lm_head_logprobs(hidden, weight, target, with_entropy=True, impl="chunked")
    assert torch.all(lp <= 0) and torch.all(ent >= 0)
    ref, ref_ent = naive(hidden, weight, target, v_true=v)
    torch.testing.assert_close(lp, ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ent, ref_ent, atol=2e-2, rtol=2e-2)
    # a flat distribution over 262k ids: lse = log V + O(eps); accumulators must not drift
    flat = torch.zeros(v, hh, dtype=torch.bfloat16)
    lp = lm_head_logprobs(hidden, flat, target, impl="chunked")
    torch.testing.assert_close(lp, torch.full_like(lp, -torch.log(torch.tensor(v * 1.0)).item()),
                               atol=1e-5, rtol=0)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Triton kernels through the interpreter (CPU): `triton` is in the dev extra (Linux wheels), so
# CI runs the kernels' arithmetic. TRITON_INTERPRET must be set before triton is imported, so
# the checks run in a child process.
# ----------------------------------------------------------------------------------------------
def _interpreted_checks() -> None:
    """Run in a child with TRITON_INTERPRET=1: Triton blocks == torch blocks == naive."""
    from rlrt_megatron.megatron import lm_head_triton

    # several tiles per row, ragged row tiles (9 rows)
    lm_head_triton.CONFIG = {"stats": (2, 64, 1), "grad": (4, 64, 1)}
    blocks = lm_head_triton.TritonBlocks
    lm_head._BLOCKS["cpu"] = {"fwd": (4, 300), "bwd": (4, 300)}  # several blocks, ragged ends
    h, w, tgt = make_inputs(9)
    shard = lm_head._Shard(0, V_TRUE)
    for with_entropy, scale in ((True, 1 / 0.7), (False, 1.0)):  # scale = 1 / temperature
        res = {}
        for name, impl in (("torch", lm_head._TorchBlocks), ("triton", blocks)):
            a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
            lp, ent = lm_head._LMHeadLogprobs.apply(
                a, b, tgt, shard, None, 1, with_entropy, impl, None, scale
            )
            loss = (lp * torch.linspace(-1, 2, 9)).sum()
            if with_entropy:
                loss = loss + (ent * torch.linspace(1, -1, 9)).sum()
            loss.backward()
            res[name] = (lp.detach(), ent.detach(), a.grad, b.grad)
        for x, y in zip(res["triton"], res["torch"], strict=True):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        lp_r, ent_r = naive(h * scale, w, tgt)  # temperature 1 / scale
        torch.testing.assert_close(res["triton"][0], lp_r, atol=1e-5, rtol=1e-5)
        if with_entropy:
            torch.testing.assert_close(res["triton"][1], ent_r, atol=1e-5, rtol=1e-5)
    # the gradient kernel on a bf16 block, in place; -1 = target not in this block
    g = torch.Generator().manual_seed(2)
    z = (torch.randn(5, 150, generator=g) * 3).to(torch.bfloat16)
    tgt = torch.tensor([3, -1, 149, 0, 70])
    lse = torch.logsumexp(z.float(), -1) + 0.1
    ent, g_lp, g_ent = torch.rand(5) * 3, torch.randn(5), torch.randn(5)
    z_t = z.clone()
    lm_head._TorchBlocks.grad(z_t, 0, tgt, lse, ent, g_lp, g_ent, True)
    blocks.grad(z, 0, tgt, lse, ent, g_lp, g_ent, True)
    assert z.dtype == torch.bfloat16
    torch.testing.assert_close(z.float(), z_t.float(), atol=1e-2, rtol=1e-2)
    print("interpreted triton kernels OK")


def test_triton_kernels_interpreted_match_torch_blocks():
    if sys.platform.startswith("linux"):
        import triton  # noqa: F401 - the dev extra installs it: a missing one is an error here
    else:
        pytest.importorskip("triton")
    here = pathlib.Path(__file__).resolve()
    root = here.parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(here.parent), env.get("PYTHONPATH", "")])
    code = "import test_lm_head as t; t._interpreted_checks()"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "interpreted triton kernels OK" in out.stdout


def test_config_key_is_validated():
    from recipes import get_recipe
    from rlrt_megatron.config import ConfigError

    assert get_recipe("tiny_demo", ["model.logprobs_impl=chunked"]).model.logprobs_impl == "chunked"
    with pytest.raises(ConfigError, match=r"model\.logprobs_impl"):
        get_recipe("tiny_demo", ["model.logprobs_impl=fast"])
