"""TP / PP invariance of a tiny Qwen3 through megatron's real schedules, in real gloo processes.

One 2-process spawn runs every layout in turn (re-initialising megatron's model-parallel groups):
TP=1/PP=1 (DP=2, both ranks on the same data, so DDP's average is the single-rank gradient),
TP=2, PP=2 (1F1B) and PP=2 with 2 virtual stages (interleaved), each with 4 micro-batches
through ``get_forward_backward_func`` and megatron DDP + ``finalize_model_grads`` (TP sum of
q/k-layernorm grads, tied-embedding grad all-reduce between the first and last stage).
TP=2 with sequence parallelism, local and torch specs: the norms' weight gradients (each TP
rank's tokens only) must be summed over TP (`megatron/norm.py`).
All layouts start from the same weights: the TP=1 model's, gathered and re-sharded.
Loss and every gradient (gathered back to the TP=1 layout) must agree, and so must the global
grad norm and the weights after one clipped Adam step of megatron's optimizer (the plain one for
the reference, the DistributedOptimizer for TP=1/DP=2 and most other layouts).

Data parallelism proper: DP=2 with *different* micro-batches per rank against the reference on
both halves together (every rank running all 8 micro-batches: DP=1 on the concatenated batch).
DDP's average of the two halves' gradients is that gradient only if the gradients really are
all-reduced; with the same data on both ranks a missing all-reduce would pass.

Tolerances: fp32, accumulation order differs per layout. Each gradient tensor must satisfy
``|g - ref| <= RTOL |ref| + ATOL`` (Frobenius norms), and every reference gradient norm must be
far above ATOL, so the relative term is what is tested (an absolute 1e-5 alone says nothing
about a tensor whose gradients are ~1e-5).
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed

VOCAB = 1000  # not a multiple of 128: exercises the padded-vocab rows
SEQ, MBS, NUM_MB = 16, 2, 4
LR, CLIP = 0.5, 1.0  # the grad norm of the tiny model is ~2, so clipping is active
RTOL, ATOL = 1e-5, 1e-9  # per gradient tensor, on norms; measured worst ~6e-7 relative


def _hf_config(tied: bool, layers: int):
    from rlrt_megatron.convert.tiny import tiny_config

    return tiny_config(vocab_size=VOCAB, tied=tied, num_layers=layers)


def _microbatches(n: int = NUM_MB) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g)
        mask = (torch.rand(MBS, SEQ, generator=g) > 0.2).float()
        out.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": mask})
    return out


def _ce_loss(batch, logits):
    """Token-mean CE over the true vocab from vocab-parallel logits (padded columns -> -inf)."""
    from megatron.core import parallel_state, tensor_parallel

    v_local = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * v_local
    cols = torch.arange(start, start + v_local, device=logits.device)
    logits = logits.float().masked_fill(cols >= VOCAB, float("-inf"))
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits, batch["labels"])
    mask = batch["loss_mask"]
    loss = (losses * mask).sum() / mask.sum()
    # clone: the schedule divides `loss` in place by the number of micro-batches.
    return loss, {"loss": loss.detach().clone()}


def _run_layout(
    hf_config, tp: int, pp: int, vpp: int | None, dist_opt: bool, full_params, microbatches=None,
    spec: str = "local", sp: bool = False,
):  # fmt: skip
    import torch.distributed as dist
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from rlrt_megatron import platform
    from rlrt_megatron.megatron.model import build_model
    from rlrt_megatron.megatron.parallel import (
        forward_backward,
        gather_full_grads,
        gather_full_params,
        shard_state_dict_for_tp,
        wrap_with_ddp,
    )

    platform.init_distributed(tp=tp, pp=pp, vpp=vpp, seed=1234)
    chunks = build_model(
        hf_config, tp=tp, pp=pp, vpp=vpp, spec=spec, sequence_parallel=sp and tp > 1
    )
    if full_params is not None:
        for chunk in chunks:
            chunk.load_state_dict(shard_state_dict_for_tp(full_params, chunk), strict=True)
    params = gather_full_params(chunks)
    ddp_chunks = wrap_with_ddp(chunks, use_distributed_optimizer=dist_opt)
    for c in ddp_chunks:
        c.zero_grad_buffer()
    mbs = _microbatches() if microbatches is None else microbatches
    reduced = forward_backward(ddp_chunks, mbs, _ce_loss)
    if dist_opt and dist.get_world_size() // (tp * pp) > 1:
        # Reduce-scattered: each DP rank holds only its shard of the reduced grads.
        with pytest.raises(ValueError, match="reduce-scattered"):
            gather_full_grads(ddp_chunks)
        grads = None
    else:
        grads = gather_full_grads(ddp_chunks)
    # Losses live on the last pipeline stage: share them with everyone.
    per_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, [r["loss"].item() for r in reduced])
    losses = next(x for x in per_rank if x)

    # One clipped Adam step through megatron's optimizer (the distributed one when model-parallel):
    # the global grad norm must count TP-replicated and PP-tied params once. adam_eps=1 keeps the
    # first step ~ lr * g (with a tiny eps it is lr * sign(g), ill-conditioned where g ~ 0).
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=LR, adam_eps=1.0, weight_decay=0.0, clip_grad=CLIP,
            use_distributed_optimizer=dist_opt,
        ),
        ddp_chunks,
    )  # fmt: skip
    ok, grad_norm, _ = opt.step()
    assert ok
    stepped = gather_full_params(chunks)
    unchanged = [k for k in params if torch.equal(params[k], stepped[k])]
    assert not unchanged, f"optimizer step left {unchanged} unchanged"
    return params, grads, losses, float(grad_norm), stepped


def _invariance_worker(rank: int, world_size: int) -> dict:
    results: dict = {}
    tied, untied = _hf_config(tied=True, layers=2), _hf_config(tied=False, layers=2)
    cases = [
        # (tp, pp, vpp, distributed optimizer); TP=1/PP=1 with it shards Adam over DP=2.
        ("tied", tied, [(1, 1, None, True), (2, 1, None, True), (1, 2, None, True)], {}),
        ("untied", untied, [(2, 1, None, False), (1, 2, None, True)], {}),
        ("tied-4layers", _hf_config(tied=True, layers=4), [(1, 2, 2, True)], {}),
        # sequence parallelism at TP=2 (the reference is the same spec at TP=1)
        ("tied-sp", tied, [(2, 1, None, True)], {"sp": True}),
        ("untied-sp-torch", untied, [(2, 1, None, False)], {"sp": True, "spec": "torch"}),
    ]
    for case, cfg, layouts, kw in cases:
        ref_params, *ref = _run_layout(cfg, 1, 1, None, False, None, **kw)
        results[(case, 1, 1, None, False)] = tuple(ref)
        for tp, pp, vpp, dist_opt in layouts:
            params, *out = _run_layout(cfg, tp, pp, vpp, dist_opt, ref_params, **kw)
            # The re-sharded weights must reassemble to exactly the reference ones.
            assert params.keys() == ref_params.keys(), (case, tp, pp)
            for k in params:
                assert torch.equal(params[k], ref_params[k]), (case, tp, pp, k)
            results[(case, tp, pp, vpp, dist_opt)] = tuple(out)
    # DP=2, different data per rank, vs DP=1 on the concatenation (the plain optimizer: with
    # the distributed one each rank holds only its shard of the reduced gradients)
    cfg = _hf_config(tied=True, layers=2)
    both = _microbatches(2 * NUM_MB)
    ref_params, *ref = _run_layout(cfg, 1, 1, None, False, None, both)
    mine = both[rank * NUM_MB : (rank + 1) * NUM_MB]
    params, *out = _run_layout(cfg, 1, 1, None, False, ref_params, mine)
    results["dp-split"] = (tuple(ref), tuple(out))
    return results if rank == 0 else {}


def _assert_grads_close(grads: dict, ref_grads: dict, where: str) -> None:
    """Per tensor ``|g - ref| <= RTOL |ref| + ATOL``; every reference norm >> ATOL."""
    assert grads.keys() == ref_grads.keys(), where
    for name, g in grads.items():
        ref = ref_grads[name].double()
        ref_norm, err = float(ref.norm()), float((g.double() - ref).norm())
        assert ref_norm > 1e4 * ATOL, f"{where} {name}: reference grad norm {ref_norm:.3g} ~ 0"
        assert err <= RTOL * ref_norm + ATOL, (
            f"{where} {name}: |g - ref| = {err:.3g} > {RTOL} * {ref_norm:.3g} + {ATOL}"
        )


@pytest.fixture(scope="module")
def results() -> dict:
    """Every layout, computed in one 2-process spawn."""
    return run_distributed(_invariance_worker, 2, timeout=300)[0]


@pytest.mark.distributed
def test_tp_pp_invariance_loss_and_grads(results):
    results = {k: v for k, v in results.items() if k != "dp-split"}
    refs = {key[0]: v for key, v in results.items() if key[1:] == (1, 1, None, False)}
    checked = 0
    for (case, tp, pp, vpp, dist_opt), (grads, losses, grad_norm, stepped) in results.items():
        if (tp, pp, vpp, dist_opt) == (1, 1, None, False):
            continue
        ref_grads, ref_losses, ref_norm, ref_stepped = refs[case]
        assert ref_norm > CLIP, "clipping should be active"
        # fp32 accumulation order differs per layout: ~3e-6 relative. Counting all TP-replicated
        # norm weights twice (~1.7e-4 of the squared norm) or the PP-tied embedding twice (~0.6)
        # moves it by ~1e-4 and ~0.3 relative.
        assert grad_norm == pytest.approx(ref_norm, rel=1e-5), (case, tp, pp, vpp)
        assert stepped.keys() == ref_stepped.keys()
        for name, p in stepped.items():
            where = f"stepped {case} {name} tp={tp} pp={pp} vpp={vpp} dist_opt={dist_opt}"
            torch.testing.assert_close(
                p, ref_stepped[name], rtol=0, atol=1e-5, msg=lambda m, w=where: f"{w}: {m}"
            )
        assert len(losses) == NUM_MB
        where = f"loss {case} tp={tp} pp={pp} vpp={vpp} dist_opt={dist_opt}"
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(ref_losses), rtol=0, atol=1e-5,
            msg=lambda m, w=where: f"{w}: {m}",
        )  # fmt: skip
        if grads is None:  # distributed optimizer over DP=2: norm and step checked instead
            continue
        _assert_grads_close(
            grads, ref_grads, f"{case} tp={tp} pp={pp} vpp={vpp} dist_opt={dist_opt}"
        )
        checked += len(grads)
    # Tensors per layout: embedding + final norm (+ output layer if untied) + 8 per layer.
    assert checked == 3 * 18 + 3 * 19 + 34


@pytest.mark.distributed
def test_data_parallel_ranks_on_different_data_match_the_concatenated_batch(results):
    (ref_grads, ref_losses, ref_norm, ref_stepped), (grads, losses, norm, stepped) = results[
        "dp-split"
    ]
    # rank 0's losses are those of the first half of the concatenated batch
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses[:NUM_MB]))
    assert grads is not None and len(grads) == 18
    _assert_grads_close(grads, ref_grads, "dp=2 split data")
    # Teeth: rank 0's half alone (the same-data TP=1 run of the "tied" case used exactly those
    # micro-batches) has a gradient far from the average, so a missing all-reduce would fail.
    half_grads = results[("tied", 1, 1, None, False)][0]
    diff = sum(float((half_grads[k] - ref_grads[k]).norm() ** 2) for k in ref_grads) ** 0.5
    total = sum(float(ref_grads[k].norm() ** 2) for k in ref_grads) ** 0.5
    assert diff > 100 * RTOL * total, (diff, total)
    assert norm == pytest.approx(ref_norm, rel=1e-5)
    for name, p in stepped.items():
        torch.testing.assert_close(p, ref_stepped[name], rtol=1e-5, atol=1e-6, msg=name)
