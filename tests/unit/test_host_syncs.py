"""No device->host sync inside Megatron's schedule during the update (issue 24, item 12).

On a GPU every `.item()`, `.tolist()`, `bool(t)`, `int(t)`, `float(t)`, `nonzero` or boolean-mask
indexing of a device tensor stalls the host until the device catches up; inside Megatron's
schedule that serialises every micro-batch (~15 per micro-batch before the fix: the rows'
`idx.tolist()`, the metric floats, the `bool(bad.any())` of every finite check). On CPU nothing
stalls, so the test counts those calls instead: the Tensor methods that sync are wrapped for the
duration of `get_forward_backward_func()(...)` (Megatron's schedule with our forward step, loss
and backward inside), and `Policy.train_minibatch` with a real algorithm loss (GRPO with TIS, and
SRPO with its top-k distillation term) must make none. Outside the schedule it reads the metrics
once per mini-batch.
"""

from __future__ import annotations

import traceback

import pytest
import torch
import update_batch
from torch.overrides import TorchFunctionMode

from rlrt_megatron.convert.tiny import tiny_config

_SYNCING = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy",
            "nonzero", "masked_select"}  # fmt: skip


@pytest.fixture
def megatron_1proc():
    from dist_utils import single_process_megatron

    with single_process_megatron(seed=7):
        yield


class SyncCounter(TorchFunctionMode):
    """While entered, records every host-syncing tensor call (a torch function mode sees every
    Tensor method and torch function called from Python, Megatron's and ours alike) and where
    it came from."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name == "__getitem__":
            keys = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(torch.is_tensor(k) and k.dtype == torch.bool for k in keys):
                name = "bool-mask indexing"
        if name in _SYNCING or name == "bool-mask indexing":
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            where = "; ".join(f"{f.filename.split('/')[-1]}:{f.lineno}" for f in frames[-3:])
            self.calls.append(f"{name} at {where}")
        return func(*args, **(kwargs or {}))

    def around_schedule(self, monkeypatch) -> None:
        """Count only while Megatron's forward_backward_func runs."""
        import megatron.core.pipeline_parallel as pp

        real = pp.get_forward_backward_func

        def get():
            fn = real()

            def run(*a, **kw):
                with self:
                    return fn(*a, **kw)

            return run

        monkeypatch.setattr(pp, "get_forward_backward_func", get)


@pytest.mark.parametrize("algo_name", ["grpo", "srpo"])
def test_no_host_sync_inside_the_schedule(megatron_1proc, monkeypatch, algo_name):
    from rlrt_megatron import platform
    from rlrt_megatron.config import OptimizerConfig
    from rlrt_megatron.megatron.train_step import Policy

    platform.init_distributed(tp=1, pp=1)
    torch.manual_seed(3)
    policy = Policy(
        tiny_config(vocab_size=update_batch.VOCAB),
        tp=1,
        pp=1,
        optim=OptimizerConfig(lr=1e-3),
        total_steps=4,
    )
    counter = SyncCounter()
    counter.around_schedule(monkeypatch)
    out = update_batch.train(policy, algo_name)
    assert counter.calls == [], "\n".join(counter.calls)
    assert out["update_ok"] == 1.0 and out["grad_norm"] > 0
    key = "pg_clipfrac" if algo_name == "srpo" else "clipfrac"
    assert key in out and isinstance(out[key], float)
    if algo_name == "srpo":
        assert out["sd_jsd_mean"] > 0
    else:  # NaN log-probs are still caught, once per mini-batch, before the optimizer step
        with torch.no_grad():
            first = next(policy.chunks[0].parameters())
            first.fill_(float("nan"))
        others = [p.detach().clone() for p in policy.chunks[0].parameters()][1:]
        out = update_batch.train(policy, algo_name)
        assert out["update_ok"] == 0.0 and out["nonfinite_skipped"] == 1.0
        assert "log-probs" in policy.last_nonfinite and "NaN/inf" in policy.last_nonfinite
        after = [p.detach() for p in policy.chunks[0].parameters()][1:]
        assert all(torch.equal(a, b) for a, b in zip(others, after, strict=True))


def test_the_counter_sees_syncs():
    """The instrument itself: each kind of sync inside the counted region is recorded."""
    t = torch.tensor([1.0, 2.0])
    with SyncCounter() as counter:
        t.sum().item()
        t.tolist()
        bool(t.any())
        float(t[0])
        _ = t[t > 1]
        _ = t[torch.tensor([1])]  # an index tensor: no sync
    t.tolist()  # outside: not counted
    kinds = [c.split(" at ")[0] for c in counter.calls]
    assert kinds == ["item", "tolist", "__bool__", "__float__", "bool-mask indexing"], kinds
