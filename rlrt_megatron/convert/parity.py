"""Logit parity: the Megatron model (any TP x PP, loaded from a dist checkpoint) vs transformers.

`parity_worker` runs in each of tp * pp processes (torchrun-style env vars); `run_parity` spawns
them on CPU with gloo and returns the max |logit difference| over the true vocabulary.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch

from rlrt_megatron.convert import io


def random_batch(vocab_size: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    """The token batch both models see: uniform over the true vocabulary, seeded."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=gen)


@torch.no_grad()
def megatron_logits(
    model_chunks: list, tokens: torch.Tensor, vocab_size: int
) -> torch.Tensor | None:
    """Full-vocab logits [B, T, vocab_size] on the last pipeline stage (None on other stages).

    Runs Megatron's `forward_backward_func` (forward only, one micro-batch per sequence) so the
    pipeline p2p path is the production one; TP-sharded logits are gathered over the TP group.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = tokens.shape
    positions = torch.arange(seq).unsqueeze(0)
    rows = [tokens[i : i + 1] for i in range(batch)]
    # interleaved pipelining (several chunks per rank) takes one iterator per chunk
    micro_batches = (
        iter(rows) if len(model_chunks) == 1 else [iter(list(rows)) for _ in model_chunks]
    )

    def forward_step(data_iterator: Any, model: Any):
        ids = next(data_iterator)
        out = model(ids, positions, None)

        def collect(output: torch.Tensor):
            return output.sum() * 0.0, {"logits": output}

        return out, collect

    for chunk in model_chunks:
        chunk.eval()
    results = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=micro_batches,
        model=model_chunks,
        num_microbatches=batch,
        seq_length=seq,
        micro_batch_size=1,
        forward_only=True,
    )
    if not ps.is_pipeline_last_stage():
        return None
    logits = torch.cat([r["logits"] for r in results], dim=0)  # [B, T, V_pad / tp]
    full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return full[..., :vocab_size].float()


@torch.no_grad()
def hf_logits(hf_dir: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.eval()
    return model(input_ids=tokens).logits.float()


def parity_worker(
    rank: int,
    world_size: int,
    hf_dir: str,
    ckpt_dir: str,
    layouts: list[tuple[int, ...]],
    batch: int = 2,
    seq: int = 24,
    seed: int = 0,
) -> dict[tuple[int, int], float | None]:
    """In each process: for every (tp, pp) or (tp, pp, ep) layout, load the checkpoint and
    compare logits (ep: expert parallel size of a MoE model).

    Returns {layout: max_abs_logit_diff} on the global last rank (None elsewhere). The
    comparison is in fp32 regardless of the checkpoint dtype.
    """
    import torch.distributed as dist

    from rlrt_megatron import platform
    from rlrt_megatron.convert.load import load_checkpoint_into_model
    from rlrt_megatron.megatron.model import build_model

    torch.set_num_threads(1)
    config = io.read_hf_config(hf_dir)
    tokens = random_batch(int(config["vocab_size"]), batch, seq, seed)
    reference = hf_logits(hf_dir, tokens) if rank == world_size - 1 else None
    out: dict[tuple[int, ...], float | None] = {}
    try:
        for layout in layouts:
            tp, pp, ep = (*layout, 1)[:3]
            platform.init_distributed(tp=tp, pp=pp, seed=seed, ep=ep)
            chunks = build_model(config, tp=tp, pp=pp, params_dtype=torch.float32)
            load_checkpoint_into_model(chunks, ckpt_dir)
            logits = megatron_logits(chunks, tokens, int(config["vocab_size"]))
            diff = torch.tensor(-1.0)
            if logits is not None and reference is not None:
                diff = (logits - reference).abs().max()
            # the global last rank is always on the last stage; share its number with everyone
            dist.all_reduce(diff, op=dist.ReduceOp.MAX)
            out[layout] = float(diff) if rank == world_size - 1 else None
            del chunks
    finally:
        platform.destroy_distributed()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_cleanly_on_sigterm() -> None:
    """In a spawned worker: turn SIGTERM into SystemExit. When one worker fails, torch's
    `start_processes` SIGTERMs the others; without this they die at once and the named semaphores
    they created (tqdm's lock, made by transformers' progress bars under the spawn start method)
    are never unlinked: `resource_tracker: There appear to be N leaked semaphore objects` after
    the real error. With it, the interpreter unwinds and the finalizers unlink them."""

    def _exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def _spawned(rank: int, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    exit_cleanly_on_sigterm()
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    result = parity_worker(rank, world_size, *args)
    if rank == world_size - 1:
        with open(os.path.join(out_dir, "result.pkl"), "wb") as f:
            pickle.dump(result, f)


def run_parity(
    hf_dir: str | Path,
    ckpt_dir: str | Path,
    tp: int = 1,
    pp: int = 1,
    *,
    ep: int = 1,
    batch: int = 2,
    seq: int = 24,
    seed: int = 0,
) -> float:
    """Spawn tp * pp * ep CPU processes (gloo) and return the max |logit diff| vs transformers
    (ep > 1: the experts of a MoE model split over ep ranks, the rest data parallel)."""
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    world = tp * pp * ep
    with tempfile.TemporaryDirectory() as tmp:
        args = (str(hf_dir), str(ckpt_dir), [(tp, pp, ep)], batch, seq, seed)
        mp.start_processes(
            _spawned, args=(world, _free_port(), tmp, args), nprocs=world, start_method="spawn"
        )
        with open(os.path.join(tmp, "result.pkl"), "rb") as f:
            return float(pickle.load(f)[(tp, pp, ep)])
