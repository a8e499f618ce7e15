"""Entry point of one math-verify worker process: `python -m rlrt_megatron.reward._worker MEM_MB`.

Started and killed by `MathReward` (reward/math.py), which talks to it over stdin/stdout.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from rlrt_megatron.reward.math import worker_loop

    worker_loop(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
