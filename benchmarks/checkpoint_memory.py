#!/usr/bin/env python
"""Peak host memory of a checkpoint save with the distributed optimizer, per data-parallel rank:
megatron's memory-efficient `fully_reshardable` variant (what `trainer/checkpoint.py` saves) vs
its default variant (every data-parallel rank all-gathers the whole fp32 state).

Two CPU gloo processes (DP = 2, TP = PP = 1) build a Qwen3-shaped model (default ~30M
parameters: hidden 512, 4 layers, vocab 32768), take one optimizer step and save; each rank
resets its peak RSS (`/proc/self/clear_refs`) before the save and reads `VmHWM` after it. Each
variant runs in fresh processes. Prints per rank:

    variant          rank  peak_rss_delta  per_param  (12 bytes/param = the fp32 state)

and the ratio default / memory-efficient per rank. `rlrt plan` counts the same terms for a GPU
cluster (`launch/plan_checkpoint.py`; on CPU the weights need no device-to-host copy).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile

import torch.multiprocessing as mp

MIB = 2**20


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _rank(rank: int, world: int, port: int, out: str, mem_efficient: bool, args: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
    from rlrt_megatron import platform
    from rlrt_megatron.config import OptimizerConfig
    from rlrt_megatron.convert.tiny import tiny_config
    from rlrt_megatron.megatron.train_step import Policy
    from rlrt_megatron.trainer.checkpoint import Checkpointer
    from rlrt_megatron.trainer.optimizer_state import OPTIMIZER_METADATA

    OPTIMIZER_METADATA["distrib_optim_fully_reshardable_mem_efficient"] = mem_efficient
    platform.init_distributed(1, 1, seed=5)
    cfg = tiny_config(vocab_size=args["vocab"], num_layers=args["layers"])
    h = args["hidden"]
    cfg.update(dict(hidden_size=h, intermediate_size=3 * h, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=h // 8))  # fmt: skip
    policy = Policy(cfg, tp=1, pp=1, optim=OptimizerConfig(lr=1e-3), total_steps=10,
                    use_distributed_optimizer=True)  # fmt: skip
    seqs, starts = [list(range(3, 40)), list(range(50, 80))], [20, 10]
    policy.train_minibatch(seqs, starts, [0, 1], 20, 128, lambda lp, r, t: (-lp.sum() / 40, {}))
    n_params = sum(p.numel() for p in policy.chunks[0].parameters())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    Checkpointer(os.path.join(out, "ckpt"), keep_last=0).save(1, policy.model, policy.optimizer, {})
    peak = _status("VmHWM") - before
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"peak": peak, "n_params": n_params}, f)
    platform.destroy_distributed()


def measure(mem_efficient: bool, args: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as out, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        mp.start_processes(_rank, args=(2, port, out, mem_efficient, args), nprocs=2,
                           start_method="spawn")  # fmt: skip
        return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in (0, 1)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32768)
    args = vars(p.parse_args(argv))
    res = {name: measure(eff, args) for name, eff in (("memory-efficient", True),
                                                      ("default", False))}  # fmt: skip
    n = res["default"][0]["n_params"]
    print(f"parameters={n / 1e6:.1f}M  fp32 optimizer state={12 * n / MIB:.0f} MiB")
    for name, ranks in res.items():
        for r, got in enumerate(ranks):
            print(f"{name:<17} rank {r}  peak_rss_delta={got['peak'] / MIB:8.1f} MiB  "
                  f"per_param={got['peak'] / n:5.1f} bytes")  # fmt: skip
    for r in (0, 1):
        eff, dflt = res["memory-efficient"][r]["peak"], res["default"][r]["peak"]
        print(f"rank {r}: default / memory-efficient = {dflt / max(eff, 1):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
