"""The trainer's own config check at a job's world size, and the nearest layouts that pass it.

`rlrt plan` and `rlrt slurm submit` know the world size the trainer will see (training nodes x
ranks per node) long before it starts, so they run the same `validation_errors` the trainer runs
in `preflight` (with the model's heads and layers: its config.json, or the planner's built-in
shape) plus the per-node rules of a Slurm layout (a TP group inside one node, whole SGLang
servers per node). When that refuses, `suggest_layouts` lists the closest layouts that pass:
another node count or rollout-node count at the same TP x PP, or another TP x PP on the same
nodes. Pure arithmetic: no torch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from rlrt_megatron.config import load_hf_config, validation_errors
from rlrt_megatron.launch.plan_shapes import PlanError, model_shape


def model_dims(cfg: Any) -> dict | None:
    """The heads/layers the trainer checks TP and PP against: the model's config.json, else the
    planner's built-in shape of a recipe model, else None (those checks are skipped)."""
    hf = load_hf_config(cfg.model.hf_path) if cfg.model.hf_path else None
    if hf:
        return hf
    try:
        shape, _ = model_shape(cfg.model.hf_path, cfg.model.build_tiny)
    except PlanError:
        return None
    dims = {"num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads,
            "num_hidden_layers": shape.layers}  # fmt: skip
    if shape.experts:  # a built-in MoE shape: the trainer's EP checks need its expert count
        dims.update(model_type="qwen3_moe", num_experts=shape.experts)
    return dims


def ranks_per_node(gpus_per_node: int) -> int:
    return gpus_per_node if gpus_per_node > 0 else 1  # 0 = CPU: one gloo rank per node


def world_size(nodes: int, gpus_per_node: int, rollout_nodes: int = 0) -> int:
    return (nodes - rollout_nodes) * ranks_per_node(gpus_per_node)


def trainer_errors(
    cfg: Any, *, nodes: int, gpus_per_node: int, rollout_nodes: int = 0, dims: dict | None = None
) -> list[str]:
    """What the trainer (and the node layout) would refuse at this job's world size: the
    trainer's own messages (`TrainConfig.validate(world_size=...)`), then the per-node rules."""
    world = world_size(nodes, gpus_per_node, rollout_nodes)
    if world < 1:
        return [f"{nodes} node(s) with {rollout_nodes} rollout node(s) leave no training rank"]
    errs = validation_errors(cfg, dims if dims is not None else model_dims(cfg), world)
    tp, g = cfg.parallel.tp, gpus_per_node
    if g > 0 and tp >= 1 and (tp > g or g % tp):
        errs.append(
            f"parallel.tp: {tp} does not divide the {g} GPUs of a node; a TP group must stay "
            "inside one node"
        )
    if g > 0 and rollout_nodes > 0 and g % max(1, cfg.rollout.sglang_tp):
        errs.append(f"rollout.sglang_tp: {cfg.rollout.sglang_tp} does not divide the {g} GPUs "
                    "of a rollout node")  # fmt: skip
    return errs


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def suggest_layouts(
    cfg: Any,
    *,
    nodes: int,
    gpus_per_node: int,
    rollout_nodes: int = 0,
    fits: Callable[[Any, int, int], bool] | None = None,
    limit: int = 3,
) -> list[str]:
    """Up to `limit` layouts close to the given one that the trainer accepts (and that `fits`,
    `fits(cfg, nodes, rollout_nodes) -> bool`, when given), nearest first, each as the flags or
    overrides to change and the resulting ranks: other node counts, other rollout-node counts,
    other `parallel.tp` / `parallel.pp` on the same nodes."""
    dims = model_dims(cfg)
    cands: list[tuple[float, str]] = []

    def ok(c: Any, n: int, k: int) -> bool:
        if trainer_errors(c, nodes=n, gpus_per_node=gpus_per_node, rollout_nodes=k, dims=dims):
            return False
        return fits is None or fits(c, n, k)

    def ranks(c: Any, n: int, k: int) -> str:
        w, tp, pp = world_size(n, gpus_per_node, k), c.parallel.tp, c.parallel.pp
        return f"{w} ranks: tp {tp} x pp {pp} x dp {w // (tp * pp)}"

    k0 = rollout_nodes
    for n in range(k0 + 1, 2 * nodes + 1):  # more or fewer training nodes
        if n != nodes and ok(cfg, n, k0):
            flags = f"--nodes {n}" + (f" --rollout-nodes {k0}" if k0 else "")
            cands.append((abs(n - nodes) + 0.5 * (n < nodes), f"{flags} ({ranks(cfg, n, k0)})"))
    for k in range(0, nodes):  # the same nodes, another split
        if k != k0 and ok(cfg, nodes, k):
            flags = f"--nodes {nodes} --rollout-nodes {k}"
            cands.append((abs(k - k0) + 0.25, f"{flags} ({ranks(cfg, nodes, k)})"))
    layers = (dims or {}).get("num_hidden_layers") or 1
    for tp in _divisors(max(gpus_per_node, 1)):
        for pp in _divisors(int(layers)):
            if (tp, pp) == (cfg.parallel.tp, cfg.parallel.pp):
                continue
            c = copy.deepcopy(cfg)
            c.parallel.tp, c.parallel.pp = tp, pp
            c.parallel.sequence_parallel = c.parallel.sequence_parallel and tp > 1
            if ok(c, nodes, rollout_nodes):
                changed = [f"parallel.tp={tp}"] * (tp != cfg.parallel.tp) + [
                    f"parallel.pp={pp}"
                ] * (pp != cfg.parallel.pp)
                cost = len(changed) + abs(tp * pp - cfg.parallel.tp * cfg.parallel.pp) / 8
                cands.append((cost, f"{' '.join(changed)} ({ranks(c, nodes, rollout_nodes)})"))
    cands.sort(key=lambda t: t[0])
    return [text for _, text in cands[:limit]]


def check_world(
    cfg: Any,
    *,
    nodes: int,
    gpus_per_node: int,
    rollout_nodes: int = 0,
    fits: Callable[[Any, int, int], bool] | None = None,
) -> tuple[list[str], list[str]]:
    """(the trainer's errors at this layout, valid layouts near it if there are errors)."""
    errs = trainer_errors(cfg, nodes=nodes, gpus_per_node=gpus_per_node,
                          rollout_nodes=rollout_nodes)  # fmt: skip
    if not errs:
        return [], []
    return errs, suggest_layouts(cfg, nodes=nodes, gpus_per_node=gpus_per_node,
                                 rollout_nodes=rollout_nodes, fits=fits)  # fmt: skip
