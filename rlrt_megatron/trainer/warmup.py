"""The tiny demo model: built (`convert.tiny`), then briefly SFT-warmed on synthetic solutions.

A random model never produces a correct `\\boxed{}` answer, so RL would see only zero rewards.
A few hundred steps of plain next-token training on worked synthetic solutions (prompt rendered
exactly as the trainer renders it, loss on the response tokens) give a policy that is right
some of the time: the regime where RL has something to learn. Runs in plain torch on the HF
model (fastest on CPU); the result is cached in the target directory (`rlrt_sft.json`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from typing import Any

import torch


def build_warm_tiny_model(hf_dir: str, cfg: Any, log: Callable[[str], None] = print) -> str:
    """Make the tiny Qwen3 at `hf_dir` and SFT-warm it for `cfg.model.sft_warmup_steps`."""
    marker = os.path.join(hf_dir, "rlrt_sft.json")
    want = {
        "steps": cfg.model.sft_warmup_steps,
        "lr": cfg.model.sft_lr,
        "seed": cfg.train.seed,
        "max_operand": cfg.data.synthetic_max_operand,
        "instruction": cfg.data.instruction,
        "arch": cfg.model.tiny_arch,
    }
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f).get("config") == want:
                return hf_dir
    from rlrt_megatron.convert.tiny import make_tiny_model

    tmp = hf_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    make_tiny_model(tmp, seed=cfg.train.seed, arch=cfg.model.tiny_arch)
    stats = {}
    if cfg.model.sft_warmup_steps > 0:
        t0 = time.perf_counter()
        stats = sft_warmup(tmp, cfg, log=log)
        stats["seconds"] = time.perf_counter() - t0
    with open(os.path.join(tmp, "rlrt_sft.json"), "w") as f:
        json.dump({"config": want, "stats": stats}, f, indent=1)
    shutil.rmtree(hf_dir, ignore_errors=True)
    os.replace(tmp, hf_dir)
    return hf_dir


def sft_warmup(hf_dir: str, cfg: Any, log: Callable[[str], None] = print, batch: int = 32) -> dict:
    """Next-token training on synthetic (prompt, solution) pairs; saves the model in place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlrt_megatron import platform
    from rlrt_megatron.data import PromptTemplate, render_prompt
    from rlrt_megatron.data.synthetic import arithmetic_problem

    torch.manual_seed(cfg.train.seed)
    dev = platform.device()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    # fp32 on every device: the warm-up is small and its result is the demo's starting point
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(dev)
    model.train()
    template = PromptTemplate(instruction=cfg.data.instruction)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    rng = random.Random(cfg.train.seed + 7919)  # other problems than the RL prompts' stream
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.model.sft_lr, weight_decay=0.0)
    steps = cfg.model.sft_warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / steps)
    )
    cache: dict[str, list[int]] = {}
    losses = []
    for step in range(steps):
        seqs, starts = [], []
        for _ in range(batch):
            row = arithmetic_problem(rng, max_operand=cfg.data.synthetic_max_operand)
            p = cache.get(row["problem"])
            if p is None:
                p = render_prompt(tok, row["problem"], template).token_ids
                cache[row["problem"]] = p
            r = tok(" " + row["solution"], add_special_tokens=False)["input_ids"] + [eos]
            seqs.append(p + r)
            starts.append(len(p))
        width = max(len(s) for s in seqs)
        ids = torch.full((batch, width), pad, dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        attn = torch.zeros((batch, width), dtype=torch.long)
        for i, (s, st) in enumerate(zip(seqs, starts, strict=True)):
            ids[i, : len(s)] = torch.tensor(s)
            labels[i, st : len(s)] = torch.tensor(s[st:])
            attn[i, : len(s)] = 1
        ids, attn, labels = (t.to(dev, non_blocking=True) for t in (ids, attn, labels))
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.detach())  # read on the host only when logged (no sync per step)
        if (step + 1) % 100 == 0:
            log(f"sft warm-up step {step + 1}/{steps}: loss {_mean(losses[-100:]):.3f}")
    model.cpu().save_pretrained(hf_dir)
    return {"final_loss": _mean(losses[-20:]) if losses else 0.0}


def _mean(xs: list[torch.Tensor]) -> float:
    return float(torch.stack(xs).mean())
