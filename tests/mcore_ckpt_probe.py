"""Write a training checkpoint with this interpreter's megatron-core, or load one written by
another (tests/unit/test_mcore_versions.py runs it under both venvs).

    python tests/mcore_ckpt_probe.py save DIR   # tiny policy, one step, checkpoint + expectations
    python tests/mcore_ckpt_probe.py load DIR   # fresh policy, load, compare; prints one JSON line

`save` writes DIR/ckpt (a Checkpointer root), DIR/expected.pt (parameters and Adam state at the
save, parameters one step later) and DIR/writer.json. `load` restores into a fresh policy and
checks parameters, Adam state and the next step bit for bit, then exports the checkpoint to HF
(megatron_to_hf) and checks those weights too.
"""

from __future__ import annotations

import json
import os
import sys

import torch


def _policy():
    from rlrt_megatron import platform
    from rlrt_megatron.config import OptimizerConfig
    from rlrt_megatron.convert.tiny import tiny_config
    from rlrt_megatron.megatron.train_step import Policy

    platform.init_distributed(1, 1, seed=5)
    return Policy(
        tiny_config(vocab_size=256), tp=1, pp=1, optim=OptimizerConfig(lr=1e-2), total_steps=10
    )


def _step(policy) -> None:
    seqs, starts = [list(range(3, 15)), list(range(20, 30))], [5, 3]
    policy.train_minibatch(seqs, starts, [0, 1], 7, 64, lambda lp, r, t: (-lp.sum() / 14.0, {}))


def _params(policy) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in policy.chunks[0].named_parameters()}


def _adam(policy) -> dict[str, torch.Tensor]:
    out = {}
    for i, opt in enumerate(policy.optimizer.chained_optimizers):
        for j, st in enumerate(opt.optimizer.state.values()):
            for k in ("exp_avg", "exp_avg_sq"):
                out[f"{i}.{j}.{k}"] = st[k].detach().clone()
    return out


def save(root: str) -> dict:
    from rlrt_megatron.megatron import compat
    from rlrt_megatron.trainer.checkpoint import Checkpointer

    policy = _policy()
    _step(policy)
    ck = Checkpointer(os.path.join(root, "ckpt"))
    expected = {"params": _params(policy), "adam": _adam(policy)}
    ck.save(1, policy.model, policy.optimizer, {"note": "probe"})
    _step(policy)
    expected["next"] = _params(policy)
    torch.save(expected, os.path.join(root, "expected.pt"))
    info = compat.versions()
    with open(os.path.join(root, "writer.json"), "w") as f:
        json.dump(info, f)
    return {"saved": True, **info}


def load(root: str) -> dict:
    from rlrt_megatron.convert.megatron_to_hf import megatron_to_hf
    from rlrt_megatron.megatron import compat
    from rlrt_megatron.trainer.checkpoint import Checkpointer

    expected = torch.load(os.path.join(root, "expected.pt"), weights_only=True)
    policy = _policy()
    ck = Checkpointer(os.path.join(root, "ckpt"))
    path = ck.latest()
    ck.load(path, policy.model, policy.optimizer)
    got = {
        "same_params": all(
            torch.equal(expected["params"][n], p) for n, p in _params(policy).items()
        ),
        "same_adam": all(torch.equal(expected["adam"][k], v) for k, v in _adam(policy).items()),
    }
    _step(policy)
    got["same_next"] = all(torch.equal(expected["next"][n], p) for n, p in _params(policy).items())
    from rlrt_megatron.convert.tiny import tiny_config

    hf_dir = os.path.join(root, f"hf_{compat.MCORE_VERSION}")
    cfg = tiny_config(vocab_size=256)
    os.makedirs(os.path.join(root, "hfcfg"), exist_ok=True)
    cfg_path = os.path.join(root, "hfcfg", "config.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg), f)
    megatron_to_hf(os.path.join(path, "dist"), hf_dir, hf_config_dir=os.path.dirname(cfg_path))
    from safetensors.torch import load_file

    hf = {}
    for name in os.listdir(hf_dir):
        if name.endswith(".safetensors"):
            hf.update(load_file(os.path.join(hf_dir, name)))
    emb = expected["params"]["embedding.word_embeddings.weight"]
    got["hf_export"] = torch.equal(
        hf["model.embed_tokens.weight"], emb[: hf["model.embed_tokens.weight"].shape[0]]
    )
    return {**got, **compat.versions()}


def main() -> None:
    mode, root = sys.argv[1], sys.argv[2]
    out = save(root) if mode == "save" else load(root)
    print("PROBE " + json.dumps(out))


if __name__ == "__main__":  # dist_checkpointing starts a spawn-context Manager: guard needed
    main()
