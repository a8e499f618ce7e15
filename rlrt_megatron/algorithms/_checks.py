"""Input validation shared by the algorithm functions (internal).

Every check raises ``ValueError`` naming the function, the argument and the shapes involved, so a
wrong call from the trainer is diagnosed at the call site rather than as a NaN three steps later.

Shape checks are free; value checks (finite values, a 0/1 mask) read a device tensor on the host,
a device->host sync on a GPU. The trainer validates once per step (``prepare``) and runs each
micro-batch's ``loss`` inside :func:`values_checked`, which skips the value checks there (the
model's log-probs are checked once per mini-batch by the trainer instead, see
``megatron/train_step.py``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

_STATE = threading.local()


@contextlib.contextmanager
def values_checked() -> Iterator[None]:
    """Inside, the value checks (:func:`check_finite_where`, the 0/1 check of
    :func:`mask_bool`) are skipped: the caller validated the values already (no host sync)."""
    old = getattr(_STATE, "skip", False)
    _STATE.skip = True
    try:
        yield
    finally:
        _STATE.skip = old


def _skip_values() -> bool:
    return getattr(_STATE, "skip", False)


def shape_of(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def as_tensor(fn: str, name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{fn}: `{name}` must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_ndim(fn: str, name: str, x: Tensor, ndim: int) -> None:
    if x.dim() != ndim:
        raise ValueError(f"{fn}: `{name}` must be {ndim}-D, got shape {shape_of(x)}")


def check_same_shape(fn: str, name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(
            f"{fn}: `{name}` has shape {shape_of(x)} but `{ref_name}` has shape {shape_of(ref)}; "
            "they must match"
        )


def check_rows(fn: str, name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    """``x`` is per-row ([B]) for a [B, T] reference."""
    if x.dim() != 1 or x.shape[0] != ref.shape[0]:
        raise ValueError(
            f"{fn}: `{name}` must have shape ({ref.shape[0]},) (one value per row of `{ref_name}` "
            f"{shape_of(ref)}), got {shape_of(x)}"
        )


def mask_bool(fn: str, mask: Tensor) -> Tensor:
    """Return ``mask`` as bool after checking it holds only 0/1."""
    if mask.dtype == torch.bool:
        return mask
    if not _skip_values() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{fn}: `mask` {shape_of(mask)} must contain only 0 and 1")
    return mask != 0


def check_finite_where(
    fn: str, name: str, x: Tensor, where: Tensor, allow_neg_inf: bool = False
) -> None:
    """Values at valid positions must be finite (or -inf when ``allow_neg_inf``)."""
    if _skip_values():
        return
    bad = torch.isnan(x) if allow_neg_inf else ~torch.isfinite(x)
    if allow_neg_inf:
        bad = bad | (x == float("inf"))
    bad = bad & where
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0].tolist())
        kind = "NaN/+inf" if allow_neg_inf else "NaN/inf"
        raise ValueError(
            f"{fn}: `{name}` {shape_of(x)} has {int(bad.sum())} {kind} value(s) at unmasked "
            f"positions (first at index {idx}); check the log-prob computation"
        )


def check_token_inputs(
    fn: str,
    mask: Tensor,
    tokens: dict[str, Tensor],
    rows: dict[str, Tensor | None] | None = None,
) -> Tensor:
    """The common checks of a [B, T] call: ``tokens`` are tensors shaped like the 2-D ``mask`` and
    finite at its valid positions; ``rows`` (None entries skipped) hold one value per row.
    Returns ``mask`` as bool."""
    present = {k: v for k, v in (rows or {}).items() if v is not None}
    for name, x in {**tokens, **present, "mask": mask}.items():
        as_tensor(fn, name, x)
    check_ndim(fn, "mask", mask, 2)
    for name, x in tokens.items():
        check_same_shape(fn, name, x, "mask", mask)
    for name, x in present.items():
        check_rows(fn, name, x, "mask", mask)
    valid = mask_bool(fn, mask)
    for name, x in tokens.items():
        check_finite_where(fn, name, x.detach(), valid)
    return valid


def f32(x: Tensor) -> Tensor:
    """Compute in fp32 whatever the input precision (bf16 log-probs lose ~3 digits)."""
    return x.to(torch.float32)


def masked_f32(x: Tensor, valid: Tensor) -> Tensor:
    """fp32 copy with invalid positions replaced by 0, so garbage there (NaN, inf) cannot leak
    into outputs or gradients (``torch.where`` passes zero gradient to the unselected branch)."""
    x = f32(x)
    return torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))
