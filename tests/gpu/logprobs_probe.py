"""Response log-probs of the tiny model through the Megatron policy, saved to a file.

    RLRT_DEVICE=cpu python tests/gpu/logprobs_probe.py HF_DIR MEGATRON_CKPT OUT.pt [SPEC]

Run once on the CPU and once on the GPU by tests/gpu/test_gpu_loop.py: the same fp32 weights and
tokens must give the same log-probs on both devices.
"""

from __future__ import annotations

import os
import sys

import torch


def main(hf_dir: str, ckpt: str, out: str, spec: str = "local") -> None:
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(k, v)
    from rlrt_megatron import platform
    from rlrt_megatron.config import OptimizerConfig, load_hf_config
    from rlrt_megatron.megatron.train_step import Policy

    platform.init_distributed(1, 1, seed=0)
    policy = Policy(
        load_hf_config(hf_dir), tp=1, pp=1, optim=OptimizerConfig(), total_steps=1,
        spec=spec, params_dtype=torch.float32,
    )  # fmt: skip
    policy.load_weights(ckpt)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (7, 12, 20, 5)]
    responses = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (9, 3, 15, 30)]
    teachers = [None, prompts[1] + [7, 8, 9], None, [1] + prompts[3]]
    student, teacher = policy.response_logprobs(
        prompts, responses, teachers, token_budget=64, topk=4
    )
    torch.save(
        {
            "device": str(platform.device()),
            "logprobs": student.logprobs.cpu(),
            "entropy": student.entropy.cpu(),
            "teacher_logprobs": teacher.logprobs.cpu(),
            "topk_logprobs": student.topk_logprobs.cpu(),
            "mask": student.mask.cpu(),
        },
        out,
    )
    platform.destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
