"""The planner's weight / gradient / optimizer bytes equal what megatron-core allocates.

One 4-process gloo spawn builds the tiny Qwen3 (tied and untied, vocab 1000: padded per TP) as
the trainer's `Policy` at TP x PP in {1, 2}^2 (DP = 4 / (TP x PP)), fp32 and bf16, with and
without the distributed optimizer, takes one optimizer step (Adam allocates its state) and
compares, on every rank, the bytes of the tensors megatron holds with `launch.plan.static_bytes`
for that rank's pipeline stage and data-parallel rank: exactly.
"""

from __future__ import annotations

import pytest
from dist_utils import run_distributed

pytestmark = pytest.mark.distributed

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _measure(policy) -> dict[str, int]:
    """Bytes of the weights, the grad buffers and the optimizer state this rank allocated."""
    opt = policy.optimizer.chained_optimizers[0]
    weights = grads = 0
    for chunk in policy.model:
        for buf in chunk.buffers:
            grads += _nbytes(buf.grad_data)
            weights += _nbytes(buf.param_data) if buf.param_data is not None else 0
    if not policy.use_distributed_optimizer:
        weights = sum(_nbytes(p) for c in policy.chunks for p in c.parameters())
    state = 0
    for st in opt.optimizer.state.values():
        state += sum(_nbytes(v) for k, v in st.items() if k != "step")
    # fp32 main copies of bf16 params (fp32 params are their own main params)
    for name in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):
        for group in getattr(opt, name, None) or []:
            state += sum(_nbytes(p) for p in group)
    return {"weights": weights, "grads": grads, "optimizer": state}


def _worker(rank: int, world: int) -> list:
    import torch
    from megatron.core import parallel_state as ps

    from rlrt_megatron import platform
    from rlrt_megatron.config import OptimizerConfig
    from rlrt_megatron.convert.tiny import tiny_config
    from rlrt_megatron.launch.plan import ModelShape, static_bytes
    from rlrt_megatron.megatron.train_step import Policy

    out = []
    for tied in (True, False):
        hf = tiny_config(vocab_size=1000, tied=tied)
        shape = ModelShape.from_hf(hf.to_dict())
        for tp, pp in LAYOUTS:
            platform.init_distributed(tp, pp, seed=1)
            for dtype in (torch.float32, torch.bfloat16):
                for dist_opt in (False, True):
                    policy = Policy(hf, tp=tp, pp=pp, optim=OptimizerConfig(lr=1e-3),
                                    total_steps=1, use_distributed_optimizer=dist_opt,
                                    params_dtype=dtype)  # fmt: skip
                    for m in policy.model:
                        m.zero_grad_buffer()
                    policy.optimizer.step()
                    pred = static_bytes(
                        shape, tp=tp, pp=pp, dp=ps.get_data_parallel_world_size(),
                        stage=ps.get_pipeline_model_parallel_rank(), distributed=dist_opt,
                        param_bytes=2 if dtype == torch.bfloat16 else 4,
                        dp_rank=ps.get_data_parallel_rank(),
                    )  # fmt: skip
                    predicted = {
                        "weights": pred.weights, "grads": pred.grads, "optimizer": pred.optimizer
                    }  # fmt: skip
                    case = (rank, tied, tp, pp, str(dtype), dist_opt)
                    out.append((case, predicted, _measure(policy)))
    return out


def test_planner_bytes_equal_megatron_allocations():
    results = run_distributed(_worker, 4, timeout=900)
    cases = [c for per_rank in results for c in per_rank]
    assert len(cases) == 4 * 2 * len(LAYOUTS) * 2 * 2
    wrong = [(case, pred, meas) for case, pred, meas in cases if pred != meas]
    assert not wrong, "\n".join(map(str, wrong[:8]))
