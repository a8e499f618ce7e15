"""Small-sample statistics for `rlrt compare`: mean, standard error, Student's t distribution,
the paired t-test and the t-based 95% interval. Pure Python (no scipy): three seeds need no more.

Student's t CDF through the regularized incomplete beta function,
    P(|T| > t) = I_x(nu / 2, 1 / 2),  x = nu / (nu + t^2),
with I_x evaluated by its continued fraction (modified Lentz), accurate to ~1e-12.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def stderr(xs: Sequence[float]) -> float:
    """Standard error of the mean, sd / sqrt(n) with the n - 1 sample sd; nan for n < 2."""
    n = len(xs)
    if n < 2:
        return math.nan
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x={x} outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    # the continued fraction converges fast for x < (a + 1) / (a + b + 2); use symmetry otherwise
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - betainc(b, a, 1.0 - x)
    return math.exp(log_front) * _betacf(a, b, x) / a


def _betacf(a: float, b: float, x: float, eps: float = 1e-15, max_iter: int = 500) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: float) -> float:
    """The `q` quantile (0.5 < q < 1) of Student's t, by bisection on the CDF."""
    target = 2.0 * (1.0 - q)  # two-sided tail probability
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > target:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_two_sided_p(mid, df) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


def ci95_halfwidth(xs: Sequence[float]) -> float:
    """Half-width of the t-based 95% interval of the mean (0 for one value)."""
    if len(xs) < 2:
        return 0.0
    return t_quantile(0.975, len(xs) - 1) * stderr(xs)


@dataclass(frozen=True)
class PairedTest:
    """`a - b` over paired samples (one pair per seed)."""

    n: int
    mean_diff: float
    se_diff: float
    t: float
    p: float  # two-sided; nan when n < 2
    a_wins: int
    b_wins: int
    ties: int


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Paired t-test of H0: mean(a - b) = 0, df = n - 1. Identical differences give t = +-inf
    and p = 0 (or t = 0, p = 1 when they are all zero)."""
    if len(a) != len(b):
        raise ValueError(f"paired_t_test: {len(a)} != {len(b)} samples")
    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    wins = sum(x > 0 for x in d)
    losses = sum(x < 0 for x in d)
    m, se = mean(d), stderr(d)
    if n < 2:
        t, p = math.nan, math.nan
    elif se == 0.0:
        t = 0.0 if m == 0.0 else math.copysign(math.inf, m)
        p = 1.0 if m == 0.0 else 0.0
    else:
        t = m / se
        p = t_two_sided_p(t, n - 1)
    return PairedTest(n, m, se, t, p, wins, losses, n - wins - losses)
