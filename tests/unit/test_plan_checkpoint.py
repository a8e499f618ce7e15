"""`rlrt plan`'s checkpoint-save rows (`launch/plan_checkpoint.py`): host memory per process and
per node, disk. The 12 bytes per parameter gathered on data-parallel rank 0 are checked against
what megatron allocates by `test_optimizer_save_gathers_on_dp_rank_0_only` (test_checkpoint.py)."""

from __future__ import annotations

from rlrt_megatron.launch.plan import Layout, Settings, predict, render
from rlrt_megatron.launch.plan_checkpoint import GIB, save_cost
from rlrt_megatron.launch.plan_shapes import BUILTIN_SHAPES, stage_params


def test_save_cost_of_8b_at_tp4():
    shape = BUILTIN_SHAPES["qwen3-8b"]
    lay = Layout(nodes=2, gpus_per_node=8, tp=4, pp=1)  # dp 4
    s = Settings()  # bf16, distributed optimizer, no teacher copy
    n = sum(p[0] for p in stage_params(shape, 4, 1, 0))  # one TP shard
    c = save_cost(shape, lay, s)
    # rank 0 of each TP group gathers 12 N (+ 12 N of transients), the writer copies it (views)
    # and the bf16 weights
    assert c["dp0"] == 24 * n + max(12 * n / 4, 2 * n)
    assert c["other"] == 12 * n / 4  # the other data-parallel ranks: their own 1/DP slice
    assert c["default_dp"] == 24 * n + 12 * n / 4  # megatron's default: every rank gathers
    assert c["other"] < c["default_dp"] <= c["dp0"]
    assert c["node"] == 4 * c["dp0"] + 4 * c["other"]  # ranks 0-3 are DP rank 0 of their group
    assert c["disk"] == 4 * n * (2 + 12)
    plain = save_cost(shape, lay, Settings(distributed_optimizer=False))
    assert plain["other"] == 0 and plain["dp0"] == 12 * n + 2 * n


def test_plan_prints_the_save_rows():
    shape = BUILTIN_SHAPES["qwen3-8b"]
    plan = predict(shape, Layout(2, 8, 4, 1), Settings(), 79.6, "built-in")
    text = render(plan)
    assert "checkpoint save (GiB, host" in text
    c = save_cost(shape, plan.layout, plan.settings)
    assert f"{c['dp0'] / GIB:8.2f}" in text and f"{c['disk'] / GIB:8.2f}" in text
    assert text.splitlines()[-1].startswith("fits=")  # the summary stays the last line
