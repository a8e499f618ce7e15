"""`model.spec=torch` under tensor and pipeline parallelism (gloo, 2 processes, CPU, fp32).

The same weights (a TP=1 local-spec model, re-sharded) run as TP=1 local (dense block-causal
mask), TP=1 torch, TP=2 torch and PP=2 torch (packed `thd` rows through the pipeline
schedule): response log-probs + entropy and, through `forward_backward_responses` (megatron DDP),
the loss and every parameter gradient agree within 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed

pytestmark = pytest.mark.distributed

VOCAB = 1000  # not a multiple of 128 * tp: padded vocab rows are masked
BUDGET = 40


def _rollouts():
    g = torch.Generator().manual_seed(3)
    shapes = [(5, 7), (12, 3), (3, 9), (8, 1), (6, 6), (10, 4), (4, 8)]
    seqs = [torch.randint(0, VOCAB, (p + r,), generator=g).tolist() for p, r in shapes]
    weights = torch.randn(len(shapes), max(r for _, r in shapes), generator=g)
    return seqs, [p for p, _ in shapes], weights


def _run(spec: str, tp: int, pp: int, full_params):
    import torch.distributed as dist

    from rlrt_megatron import platform
    from rlrt_megatron.convert.tiny import tiny_config
    from rlrt_megatron.megatron.forward import compute_response_logprobs, forward_backward_responses
    from rlrt_megatron.megatron.model import build_model
    from rlrt_megatron.megatron.parallel import (
        gather_full_grads,
        gather_full_params,
        shard_state_dict_for_tp,
        wrap_with_ddp,
    )

    platform.init_distributed(tp=tp, pp=pp, seed=99)
    chunks = build_model(tiny_config(vocab_size=VOCAB), tp=tp, pp=pp, spec=spec)
    if full_params is not None:
        for c in chunks:
            c.load_state_dict(shard_state_dict_for_tp(full_params, c), strict=True)
    params = gather_full_params(chunks)
    seqs, starts, weights = _rollouts()
    rows = 2 if spec == "local" else 1  # thd: one packed row per micro-batch
    lp = compute_response_logprobs(
        chunks, seqs, starts, token_budget=BUDGET, rows_per_microbatch=rows, with_entropy=True
    )
    ddp = wrap_with_ddp(chunks)
    for c in ddp:
        c.zero_grad_buffer()

    def loss_fn(mb, o):
        loss = (weights[o["rollout_index"]] * o["logprobs"] + 0.1 * o["entropy"]).sum()
        return loss, {"loss": loss.detach().clone()}

    red = forward_backward_responses(
        ddp, seqs, starts, loss_fn, token_budget=BUDGET, rows_per_microbatch=rows,
        with_entropy=True, response_len=weights.shape[1],
    )  # fmt: skip
    # the schedule divides each micro-batch's loss by their number; undo it
    losses: list = [None] * dist.get_world_size()
    dist.all_gather_object(losses, ([float(r["loss"]) for r in red], len(red)))
    total, n_mb = next((sum(x), n) for x, n in losses if x)
    grads = {k: v * n_mb for k, v in gather_full_grads(ddp).items()}
    return params, {"logprobs": lp.logprobs, "entropy": lp.entropy, "loss": total, "grads": grads}


def _worker(rank: int, world_size: int) -> dict:
    params, out = _run("local", 1, 1, None)
    res = {"local": out}
    for spec, tp, pp in (("torch", 1, 1), ("torch", 2, 1), ("torch", 1, 2)):
        res[(spec, tp, pp)] = _run(spec, tp, pp, params)[1]
    return res


def test_torch_spec_tp2_pp2_match_tp1_local():
    for rank, res in enumerate(run_distributed(_worker, 2, timeout=600)):
        ref = res["local"]
        for layout in (("torch", 1, 1), ("torch", 2, 1), ("torch", 1, 2)):
            out, where = res[layout], f"rank {rank} {layout}"
            torch.testing.assert_close(out["logprobs"], ref["logprobs"], atol=1e-5, rtol=0)
            torch.testing.assert_close(out["entropy"], ref["entropy"], atol=1e-5, rtol=0)
            assert abs(out["loss"] - ref["loss"]) < 1e-4, where
            for name, g in ref["grads"].items():
                torch.testing.assert_close(
                    out["grads"][name], g, atol=1e-5, rtol=1e-4,
                    msg=lambda m, n=name, w=where: f"{w} {n}: {m}",
                )  # fmt: skip
