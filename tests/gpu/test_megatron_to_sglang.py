"""GPU: the production sync path end to end on one GPU: a Megatron policy (local and TE spec)
-> convert.load.iter_hf_weights -> SGLangEngine.update_weights (colocated, CUDA IPC) -> the
server samples with the new weights. Needs CUDA + sglang (+ transformer_engine for spec=te).

    .venv/bin/python -m pytest -q -m gpu tests/gpu/test_megatron_to_sglang.py -s

Check: the behaviour log-probs SGLang returns after the sync agree with transformers run on the
tensors the trainer pushed (check_logprob_agreement, mean |diff| <= 0.05), and disagree with
the pre-sync weights (so the check would catch a skipped sync).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

pytestmark = pytest.mark.gpu

EXTRA = ["--attention-backend", "triton", "--disable-cuda-graph", "--log-level", "warning"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("sglang", reason="needs the gpu extra")
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())).items():  # fmt: skip
        os.environ.setdefault(k, v)
    from rlrt_megatron import platform
    from rlrt_megatron.convert.hf_to_megatron import hf_to_megatron
    from rlrt_megatron.convert.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("m2s")
    hf_dir = make_tiny_model(root / "hf", dtype=torch.bfloat16)
    ckpt = hf_to_megatron(hf_dir, root / "mcore", dtype="bf16", show_progress=False)
    platform.init_distributed(tp=1, pp=1)
    yield str(hf_dir), str(ckpt), root
    platform.destroy_distributed()


@torch.no_grad()
def _hf_logprobs(hf_dir, weights, prompt, tokens):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).cuda()
    if weights is not None:
        missing, _ = m.load_state_dict({n: t.float() for n, t in weights}, strict=False)
        assert all("lm_head" in n for n in missing), missing  # tied head only
    ids = torch.tensor([prompt + tokens]).cuda()
    logp = torch.log_softmax(m(ids).logits.float(), -1)[0]
    return torch.tensor([logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens)])


@pytest.mark.parametrize("spec", ["local", "te"])
def test_megatron_weights_reach_sglang(setup, spec):
    from transformers import AutoConfig

    from rlrt_megatron.convert.load import iter_hf_weights, load_checkpoint_into_model
    from rlrt_megatron.megatron.model import build_model
    from rlrt_megatron.rollout.base import GenerateRequest, SamplingParams
    from rlrt_megatron.rollout.sglang import SGLangEngine
    from rlrt_megatron.rollout.weight_sync import check_logprob_agreement

    if spec == "te":
        pytest.importorskip("transformer_engine.pytorch", reason="needs the gpu extra")
    hf_dir, ckpt, root = setup
    chunks = build_model(AutoConfig.from_pretrained(hf_dir), spec=spec, params_dtype=torch.bfloat16)
    load_checkpoint_into_model(chunks, ckpt)
    with torch.no_grad():  # a "training step": every weight moves
        for p in chunks[0].parameters():
            p.mul_(1.3)

    with SGLangEngine(hf_dir, mem_fraction=0.3, extra_args=EXTRA, bucket_bytes=2**20,
                      log_dir=str(root / f"logs_{spec}"), startup_timeout=600) as eng:  # fmt: skip
        stats = eng.update_weights(iter_hf_weights(chunks, dtype=torch.bfloat16), version=1)
        gb = stats["bytes"] / 1e9
        print(f"{spec}: synced {gb:.4f} GB in {stats['buckets']} buckets, {stats['seconds']:.3f}s")
        prompt = [3, 17, 42, 5]
        out = eng.generate([GenerateRequest(prompt, "p")], SamplingParams(max_new_tokens=24))
        c = out[0][0]
        assert c.weight_version == 1 and len(c.token_ids) > 0
        pushed = list(iter_hf_weights(chunks, dtype=torch.bfloat16))
        ref = _hf_logprobs(hf_dir, pushed, prompt, c.token_ids)
        engine_lp = torch.tensor(c.logprobs)
        mask = torch.ones_like(ref, dtype=torch.bool)
        agree = check_logprob_agreement(ref, engine_lp, mask, max_mean_abs_diff=0.05)
        print(f"{spec}: {agree}")
        old = _hf_logprobs(hf_dir, None, prompt, c.token_ids)  # the pre-sync weights
        stale = (old - engine_lp).abs().mean().item()
        assert stale > 2 * agree["logprob_abs_diff_mean"], "check could not tell old from new"
