"""A tiny gloo job for the Slurm tier: every rank all-reduces its rank through
`rlrt_megatron.platform.init_distributed` and prints where it ran.

`--fail-rank R --exit-code C`: rank R exits with C while the others block in a barrier (they must
be killed by the job's fail-fast, not hang). `--sleep S`: hold the ranks S seconds (for signals;
a requeued run does not wait again).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fail-rank", type=int, default=-1)
    ap.add_argument("--exit-code", type=int, default=3)
    ap.add_argument("--sleep", type=float, default=0.0)
    args, _recipe_args = ap.parse_known_args()  # `--recipe ... key=value` from the job: ignored

    import torch
    import torch.distributed as dist

    from rlrt_megatron.platform import init_distributed

    # a helper process with USR1's default action (like a reward worker): preemption must not
    # kill it - only the trainer process is signalled.
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    got: list[int] = []
    signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    info = init_distributed(tp=1, pp=1, seed=0, timeout_s=300)
    node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
    t = torch.tensor([float(info.rank)])
    dist.all_reduce(t)
    print(f"allreduce rank {info.rank}/{info.world_size} node {node} sum {t.item():g}", flush=True)
    if info.rank == args.fail_rank:
        print(f"rank {info.rank} on {node} failing with {args.exit_code}", flush=True)
        os._exit(args.exit_code)
    if args.fail_rank >= 0:
        dist.barrier()  # never completes: the failed rank is gone
    restarted = os.environ.get("SLURM_RESTART_COUNT", "0") != "0"
    deadline = time.monotonic() + (0.0 if restarted else args.sleep)  # a requeued run just ends
    while time.monotonic() < deadline and not got:
        time.sleep(0.2)
    if got:
        time.sleep(1)
        print(f"rank {info.rank} on {node} got USR1 x{len(got)}", flush=True)
        print(f"rank {info.rank} helper alive after USR1: {helper.poll() is None}", flush=True)
    helper.kill()
    helper.wait()
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
