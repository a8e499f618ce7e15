"""avg@k and the unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models
Trained on Code"), per problem and aggregated over a benchmark.

With ``n`` samples of one problem of which ``c`` are correct:

- ``avg@k`` (here always computed from all ``n`` samples) is the mean score ``c / n``: the expected
  accuracy of one sample (= unbiased pass@1).
- ``pass@k = 1 - C(n - c, k) / C(n, k)``: the probability that at least one of ``k`` samples drawn
  without replacement from the ``n`` is correct, an unbiased estimate of the model's pass@k.

A benchmark's metric is the mean of the per-problem values; the "average" row of a report is the
unweighted mean over benchmarks (the convention of the RLRT paper's tables).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct: ``1 - C(n-c, k) / C(n, k)``.

    Computed in the numerically stable product form (no huge binomials)::

        C(n-c, k) / C(n, k) = prod_{i = n-c+1}^{n} (1 - k / i)

    which is exactly 0 when ``n - c < k`` (every k-subset holds a correct sample).

    Raises:
        ValueError: unless ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    n, c, k = int(n), int(c), int(k)
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and n >= 1, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(
            f"pass_at_k: k={k} must be in [1, n={n}]; sample at least k answers per problem"
        )
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def avg_at_k(scores: Sequence[float]) -> float:
    """Mean score of one problem's samples: ``avg@k = (1/k) sum_j r_j`` (r_j in [0, 1])."""
    if len(scores) == 0:
        raise ValueError("avg_at_k: no scores (sample at least one answer per problem)")
    return float(sum(float(s) for s in scores) / len(scores))


def pass_ks(k: int) -> list[int]:
    """The k' reported besides k itself: 1, 2, 4, ... below k, then k."""
    out, j = [], 1
    while j < k:
        out.append(j)
        j *= 2
    return [*out, k]


def summarize_problems(
    correct_counts: Iterable[tuple[int, int]], k: int, ks: Sequence[int] | None = None
) -> dict[str, float]:
    """Benchmark metrics from per-problem ``(n, c)`` pairs.

    Returns ``{"n_problems", "avg@k", "pass@k", "pass@<j>" for j in ks}`` where every value is
    the mean over problems of the per-problem estimate; ``avg@k`` = mean of ``c / n``.
    """
    pairs = [(int(n), int(c)) for n, c in correct_counts]
    out: dict[str, float] = {"n_problems": float(len(pairs))}
    if not pairs:
        return out
    out[f"avg@{k}"] = sum(c / n for n, c in pairs) / len(pairs)
    for j in sorted(set(ks or pass_ks(k)) | {k}):
        out[f"pass@{j}"] = sum(pass_at_k(n, c, j) for n, c in pairs) / len(pairs)
    return out


def mean_over(rows: Sequence[dict[str, float]], keys: Iterable[str]) -> dict[str, float]:
    """Unweighted mean of each key over the rows that have it (the report's "average" row)."""
    out: dict[str, float] = {}
    for key in keys:
        vals = [r[key] for r in rows if key in r and not math.isnan(r[key])]
        if vals:
            out[key] = sum(vals) / len(vals)
    return out
