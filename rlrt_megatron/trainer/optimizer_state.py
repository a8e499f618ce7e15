"""The optimizer's side of a checkpoint: megatron's `fully_reshardable` format, its loader with
torch's Adam, and the Adam step kept apart (in the trainer state) for every Adam kind.

Used by `trainer/checkpoint.py`; no megatron import (it works on megatron's optimizer objects:
a `ChainedOptimizer` of `DistributedOptimizer`s or mixed-precision optimizers around torch's
Adam, TE's or Apex's FusedAdam).
"""

from __future__ import annotations

from typing import Any

import torch


def ensure_optimizer_state(optimizer: Any) -> None:
    """A fresh DistributedOptimizer has no Adam state, and its `state_dict()` (called while
    building the sharded state to load into) asserts on it: give it placeholder state first, as
    megatron does for other sharding types (`_init_optimizer_states_with_dummy_values`; the
    placeholders and the parameters are overwritten by the load)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None or len(inner.state) > 0:
            continue
        if hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()


def _inner_states(optimizer: Any) -> list[dict]:
    out = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        out.extend(getattr(inner, "state", {}).values())
    return out


def _inner_param_groups(optimizer: Any) -> list[dict]:
    out = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        out.extend(getattr(inner, "param_groups", []))
    return out


def adam_step(optimizer: Any) -> float | None:
    """The Adam step count (bias correction) of the optimizer, whichever Adam it is: torch's
    keeps a per-parameter `state[p]["step"]` tensor, TE / Apex FusedAdam one `step` per param
    group (and no per-parameter one)."""
    steps = {float(st["step"]) for st in _inner_states(optimizer) if "step" in st}
    steps |= {
        float(g["step"]) for g in _inner_param_groups(optimizer) if g.get("params") and "step" in g
    }
    return max(steps) if steps else None


def set_adam_step(optimizer: Any, step: float) -> None:
    """Set the Adam step count of every parameter (torch Adam) and param group (FusedAdam).

    The step is kept in the trainer state, apart from the sharded optimizer state: megatron-core
    0.16's DistributedOptimizer.load_state_dict (torch Adam, no TE/Apex) gives every parameter one
    shared `step` tensor (which Adam would then increment once per parameter), and its
    fully-reshardable loader skips `step` altogether; TE's FusedAdam has no per-parameter step.
    Each parameter gets its own tensor here, whatever the optimizer restored."""
    for st in _inner_states(optimizer):
        if "step" in st:
            old = st["step"]  # fused / capturable Adam keep it on the parameter's device
            st["step"] = torch.tensor(float(step), dtype=old.dtype, device=old.device)
    for g in _inner_param_groups(optimizer):
        if "step" not in g:
            continue
        old = g["step"]
        if torch.is_tensor(old):
            g["step"] = torch.full_like(old, float(step))
        else:
            g["step"] = type(old)(step)


# Megatron's layout-independent optimizer format: the DistributedOptimizer's flat buffers are
# gathered per data-parallel group on save and stored per model parameter, sharded like the
# parameter itself (TP / PP / VPP / DP all reshardable, with or without the distributed
# optimizer, since the plain optimizer stores its state the same way: one tensor per parameter
# with the parameter's sharding). Loading reads the parameter's whole tensor and slices this
# rank's range. The Adam step is not part of it (see `set_adam_step`). Saved in megatron's
# memory-efficient variant: the DistributedOptimizer's shards are gathered over gloo into the
# host memory of data-parallel rank 0 only, the one rank that writes them (the default variant
# all-gathers them through the GPU onto every DP rank, each then holding the whole fp32 state of
# its TP x PP shard, 12 bytes per parameter). Both variants load the same way.
OPTIMIZER_FORMAT = "fully_reshardable"
OPTIMIZER_METADATA = {
    "distrib_optim_sharding_type": OPTIMIZER_FORMAT,
    "distrib_optim_fully_reshardable_mem_efficient": True,
    "chained_optim_avoid_prefix": True,
}


PARAM_STATE_KIND = "param_state_sharding_type"


def _per_optimizer(opts: list[Any], state: Any) -> list[Any]:
    """The loaded state of each of this run's chained optimizers.

    Megatron keeps expert parameters in an optimizer of their own when EP > 1 (a chained
    optimizer state `{0: dense, 1: experts}`), in the dense one at EP = 1 (one state). Loading a
    checkpoint saved with the other structure, `dist_checkpointing` returns what this run asked
    for plus the saved common (non-tensor) entries under the saved structure: those extra keys
    are dropped here (the tensors are per parameter and come back whatever the structure)."""
    if len(opts) == 1:
        if isinstance(state, dict):  # e.g. the {0: ..., 1: ...} common entries of an EP > 1 save
            state = {k: v for k, v in state.items() if not isinstance(k, int)}
        return [state]
    if isinstance(state, dict):  # (and not the single optimizer's keys of an EP = 1 save)
        return [state[i] for i in range(len(opts))]
    return list(state)


def _param_groups(sd: dict) -> list | None:
    inner = sd.get("optimizer") if isinstance(sd.get("optimizer"), dict) else sd
    return inner.get("param_groups")


def _fill_common(opt: Any, sd: Any) -> None:
    """The common (non-tensor) entries of a checkpoint saved with another optimizer structure
    (`_per_optimizer`) did not come back; this run's own take their place: the param groups'
    settings (megatron matches groups by `wd_mult`, `lr_mult`, `is_expert_parallel`,
    `is_decoupled_lr`; the learning rate and weight decay are set again by the restored
    scheduler, `OptimizerParamScheduler.load_state_dict`), the distributed optimizer's
    `optimizer` entry, the grad scaler, and a placeholder for the shared Adam step (the trainer
    state's comes after the load, `set_adam_step`)."""
    if not isinstance(sd, dict):
        return
    groups = _param_groups(sd)
    if groups and all("wd_mult" in g or "pre_wd_mult" in g for g in groups):
        return  # saved with this structure: nothing missing
    for key, value in opt.state_dict().items():
        sd.setdefault(key, value)
    current = opt.optimizer.param_groups
    for group, cur in zip(_param_groups(sd) or [], current, strict=True):
        if "wd_mult" not in group and "pre_wd_mult" not in group:
            group.update({k: v for k, v in cur.items() if k != "params"})
    per_param = sd.get("state")
    if isinstance(per_param, dict) and "common_step" not in per_param:
        per_param["common_step"] = torch.tensor(0.0)


def load_optimizer_state(optimizer: Any, state: Any, fmt: str | None = None) -> None:
    """`optimizer.load_state_dict(state)`, with megatron's fully-reshardable parameter state
    loaded by its own `load_parameter_state_from_fully_reshardable` while torch Adam's
    per-parameter `step` is set aside: that loader copies every state entry of a parameter from
    the checkpoint, which has no `step` (KeyError in megatron-core 0.16). The step comes back
    from the trainer state (`set_adam_step`). A checkpoint saved at another EP (expert
    parameters in an optimizer of their own or not) loads too (`_per_optimizer`); `fmt`: the
    checkpoint's optimizer format (its trainer state's `optimizer_format`)."""
    opts = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    for opt, sd in zip(opts, _per_optimizer(opts, state), strict=True):
        _fill_common(opt, sd)
        kind = sd.get(PARAM_STATE_KIND) if isinstance(sd, dict) else None
        if kind is None and isinstance(sd, dict) and "param_state" in sd:
            kind = fmt  # (a common entry too: the format the trainer state names)
        if kind != "fully_reshardable":
            opt.load_state_dict(sd)
            continue
        common = {k: v for k, v in sd.items() if k not in ("param_state", PARAM_STATE_KIND)}
        opt.load_state_dict(common)  # param groups, the step, grad scaler
        inner = opt.optimizer.state
        steps = {p: st.pop("step") for p, st in inner.items() if "step" in st}
        opt.load_parameter_state_from_fully_reshardable(sd["param_state"])
        for p, step in steps.items():
            inner[p]["step"] = step
