"""The tiny demo model: built (`convert.tiny`), then briefly SFT-warmed on synthetic solutions.

A random model never produces a correct `\\boxed{}` answer, so RL would see only zero rewards.
A few hundred steps of plain next-token training on worked synthetic solutions (prompt rendered
exactly as the trainer renders it, loss on the response tokens) give a policy that is right
some of the time: the regime where RL has something to learn. Runs in plain torch on the HF
model (fastest on CPU); the result is cached in the target directory (`rlrt_sft.json`).

`model.sft_teacher_frac` of the examples are rendered with the teacher template instead
(`data.teacher_template`: the problem plus a correct solution of it, the context RLRT/SDPO/SRPO
show their teacher), so the model learns to read that context: without it the teacher view is
out of distribution and WORSE than the student, and every teacher-based algorithm distils or
reweights towards noise. After the warm-up `teacher_probe` measures both views' accuracy on
held-out problems (printed, and stored in `rlrt_sft.json`).
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
        "teacher_frac": cfg.model.sft_teacher_frac,
        "teacher_template": cfg.data.teacher_template if cfg.model.sft_teacher_frac else "",
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
        stats.update(teacher_probe(tmp, cfg))
        log(
            f"sft warm-up: accuracy student {stats['student_accuracy']:.3f}, teacher "
            f"{stats['teacher_accuracy']:.3f} (teacher prompt + a correct solution; "
            f"model.sft_teacher_frac={cfg.model.sft_teacher_frac}, "
            f"{stats['probe_problems']} held-out problems x {stats['probe_samples']} samples)"
        )
    with open(os.path.join(tmp, "rlrt_sft.json"), "w") as f:
        json.dump({"config": want, "stats": stats}, f, indent=1)
    shutil.rmtree(hf_dir, ignore_errors=True)
    os.replace(tmp, hf_dir)
    return hf_dir


def sft_warmup(hf_dir: str, cfg: Any, log: Callable[[str], None] = print, batch: int = 32) -> dict:
    """Next-token training on synthetic (prompt, solution) pairs; saves the model in place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlrt_megatron import platform
    from rlrt_megatron.data import PromptTemplate, render_prompt, render_teacher_prompt
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
    frac = cfg.model.sft_teacher_frac
    cache: dict[tuple[str, bool], list[int]] = {}
    losses = []
    for step in range(steps):
        seqs, starts = [], []
        for _ in range(batch):
            row = arithmetic_problem(rng, max_operand=cfg.data.synthetic_max_operand)
            # drawn only when used: frac = 0 keeps today's example stream bit for bit
            as_teacher = frac > 0 and rng.random() < frac
            p = cache.get((row["problem"], as_teacher))
            if p is None:
                if as_teacher:  # the peer shown is a correct solution (the synthetic one)
                    p = render_teacher_prompt(
                        tok, row["problem"], row["solution"], cfg.data.teacher_template, template
                    )[1]
                else:
                    p = render_prompt(tok, row["problem"], template).token_ids
                cache[(row["problem"], as_teacher)] = p
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


def teacher_probe(
    hf_dir: str, cfg: Any, problems: int = 64, samples: int = 8, seed: int = 4242
) -> dict[str, float]:
    """Accuracy of the student view (the problem) and the teacher view (the teacher template
    showing a correct solution of the same problem) of the model at `hf_dir`, sampled at
    `rollout.temperature` on held-out synthetic problems (another stream than the warm-up's and
    the RL prompts'), scored with the trainer's reward."""
    from rlrt_megatron.data import PromptTemplate, render_prompt, render_teacher_prompt
    from rlrt_megatron.data.synthetic import arithmetic_dataset
    from rlrt_megatron.reward.math import MathReward
    from rlrt_megatron.rollout.base import GenerateRequest, SamplingParams
    from rlrt_megatron.rollout.local import LocalEngine

    rows = arithmetic_dataset(problems, seed=seed, max_operand=cfg.data.synthetic_max_operand)
    engine = LocalEngine(hf_dir, seed=seed, max_batch_rows=256)
    tok = engine.tokenizer
    template = PromptTemplate(instruction=cfg.data.instruction)
    sp = SamplingParams(
        n=samples,
        temperature=cfg.rollout.temperature,
        max_new_tokens=cfg.rollout.max_new_tokens,
        seed=seed,
    )
    views = {
        "student": [render_prompt(tok, r["problem"], template).token_ids for r in rows],
        "teacher": [
            render_teacher_prompt(
                tok, r["problem"], r["solution"], cfg.data.teacher_template, template
            )[1]
            for r in rows
        ],
    }
    out: dict[str, float] = {"probe_problems": problems, "probe_samples": samples}
    reward = MathReward()
    try:
        for view, prompts in views.items():
            outs = engine.generate([GenerateRequest(p) for p in prompts], sp)
            texts = [c.text for group in outs for c in group]
            refs = [r["answer"] for r in rows for _ in range(samples)]
            scores = reward(texts, refs).scores
            out[f"{view}_accuracy"] = float(sum(scores) / max(len(scores), 1))
    finally:
        reward.close()
        engine.shutdown()
    return out


def _mean(xs: list[torch.Tensor]) -> float:
    return float(torch.stack(xs).mean())
