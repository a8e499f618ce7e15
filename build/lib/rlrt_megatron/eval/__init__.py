"""Evaluation: avg@k / pass@k on the math benchmarks, in-training eval, RLRT diagnostics.

- :mod:`.metrics`: `pass_at_k` (unbiased estimator), `avg_at_k`, per-benchmark aggregation;
- :mod:`.benchmarks`: the six benchmarks from local files (formats documented there), a built-in
  synthetic set;
- :mod:`.runner`: `evaluate` (resumable) and `run_eval` (the trainer's periodic eval);
- :mod:`.report`: console table, JSON, CSV; :mod:`.model`: `--ckpt` -> HF directory;
- :mod:`.analyze`: per-token Delta, explore/exploit tokens, reflection injection, JSD vs base.

Importing this package needs only the standard library (`metrics`); the rest load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from rlrt_megatron.eval.metrics import avg_at_k, pass_at_k, summarize_problems

_LAZY = {
    "BENCHMARKS": "benchmarks",
    "Benchmark": "benchmarks",
    "BenchmarkError": "benchmarks",
    "load_benchmarks": "benchmarks",
    "synthetic_benchmark": "benchmarks",
    "EvalReport": "runner",
    "EvalSettings": "runner",
    "evaluate": "runner",
    "run_eval": "runner",
    "flat_metrics": "runner",
}

__all__ = ["avg_at_k", "pass_at_k", "summarize_problems", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"rlrt_megatron.eval.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'rlrt_megatron.eval' has no attribute {name!r}")
