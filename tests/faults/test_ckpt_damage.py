"""Case 5, a damaged checkpoint: every checkpoint carries the size and sha256 of its files
(`manifest.json`); `resume=auto` checks them, names the damaged file, falls back to the newest
intact checkpoint with a warning, or stops (`CheckpointDamaged`, exit 2) when none is intact.
Never trains on garbage: the loaded weights are those of the checkpoint it names."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from dist_utils import single_process_megatron

pytestmark = pytest.mark.faults


def _policy():
    from rlrt_megatron.config import OptimizerConfig
    from rlrt_megatron.convert.tiny import tiny_config
    from rlrt_megatron.megatron.train_step import Policy

    return Policy(tiny_config(vocab_size=256), tp=1, pp=1, optim=OptimizerConfig(lr=1e-2),
                  total_steps=10)  # fmt: skip


def _step(policy) -> None:
    seqs, starts = [list(range(3, 15)), list(range(20, 30))], [5, 3]
    policy.train_minibatch(seqs, starts, [0, 1], 7, 64, lambda lp, rows, tk: (-lp.sum() / 14, {}))


def _sums(policy) -> dict[str, float]:
    return {n: float(p.double().sum()) for n, p in policy.chunks[0].named_parameters()}


def _largest_shard(ckpt: str) -> str:
    dist = os.path.join(ckpt, "dist")
    shards = [os.path.join(dist, f) for f in os.listdir(dist) if f.endswith(".distcp")]
    return max(shards, key=os.path.getsize)


def _flip(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x40]))


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


DAMAGE = {  # name -> (what to do to a checkpoint directory, the file the warning must name)
    "flipped_byte_in_shard": (lambda d: _flip(_largest_shard(d)), "dist/__0_0.distcp"),
    "truncated_trainer_state": (
        lambda d: _truncate(os.path.join(d, "trainer_state.json")),
        "trainer_state.json",
    ),
    "missing_shard": (lambda d: os.remove(_largest_shard(d)), "dist/__0_0.distcp: missing"),
    "missing_trainer_state": (
        lambda d: os.remove(os.path.join(d, "trainer_state.json")),
        "trainer_state.json: missing",
    ),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """iter_1 and iter_2 of one policy, and the parameter sums at each."""
    from rlrt_megatron.trainer.checkpoint import Checkpointer

    root = str(tmp_path_factory.mktemp("ckpt") / "ckpt")
    with single_process_megatron():
        policy = _policy()
        ck = Checkpointer(root, keep_last=0)
        sums = {}
        for step in (1, 2):
            _step(policy)
            ck.save(step, policy.model, policy.optimizer, {"note": f"step {step}"})
            sums[step] = _sums(policy)
    return {"root": root, "sums": sums}


def _resume(root: str, resume: str = "auto") -> dict:
    """resolve_verified + load in a fresh policy: the path, state, sums, warnings (or error)."""
    from rlrt_megatron.trainer.checkpoint import Checkpointer
    from rlrt_megatron.trainer.ckpt_manifest import CheckpointDamaged, resolve_verified

    warnings: list[str] = []
    with single_process_megatron():
        policy = _policy()
        ck = Checkpointer(root)
        t0 = time.monotonic()
        try:
            path = resolve_verified(ck, resume, warnings.append)
        except CheckpointDamaged as e:
            return {"error": str(e), "warnings": warnings, "verify_s": time.monotonic() - t0}
        verify_s = time.monotonic() - t0
        state = ck.load(path, policy.model, policy.optimizer)
        return {"path": path, "note": state["note"], "sums": _sums(policy), "warnings": warnings,
                "verify_s": verify_s}  # fmt: skip


def _copy(saved: dict, dst) -> str:
    root = str(dst / "ckpt")
    shutil.copytree(saved["root"], root)
    return root


def test_intact_checkpoint_loads_without_warning(saved, tmp_path):
    root = _copy(saved, tmp_path)
    assert os.path.isfile(os.path.join(root, "iter_0000002", "manifest.json"))
    out = _resume(root)
    assert out["path"].endswith("iter_0000002") and out["warnings"] == []
    assert out["sums"] == saved["sums"][2]


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_falls_back_to_previous(saved, tmp_path, damage, fault_row):
    root = _copy(saved, tmp_path)
    hurt, named = DAMAGE[damage]
    row = fault_row(f"5 {damage.replace('_', ' ')}", "latest checkpoint (iter_2), on disk",
                    "warning naming the file; iter_1 loaded exactly")  # fmt: skip
    hurt(os.path.join(root, "iter_0000002"))
    out = _resume(root)
    assert "error" not in out, out
    assert out["path"].endswith("iter_0000001") and out["note"] == "step 1"
    assert out["sums"] == saved["sums"][1]  # exactly the previous checkpoint, not garbage
    damaged = [w for w in out["warnings"] if "iter_0000002 is damaged" in w]
    assert len(damaged) == 1 and named in damaged[0], out["warnings"]
    assert any("resuming from" in w and "iter_0000001" in w for w in out["warnings"])
    row.update(exit="-", detect_s=round(out["verify_s"], 2), lost=0,
               observed=f"named {named.split(':')[0]}; iter_1's weights bit-exact")  # fmt: skip


def test_no_intact_checkpoint_stops(saved, tmp_path):
    from rlrt_megatron.config import ConfigError
    from rlrt_megatron.trainer.ckpt_manifest import CheckpointDamaged

    assert issubclass(CheckpointDamaged, ConfigError)  # `rlrt train` exits 2 on it
    root = _copy(saved, tmp_path)
    _flip(_largest_shard(os.path.join(root, "iter_0000002")))
    _truncate(os.path.join(root, "iter_0000001", "trainer_state.json"))
    out = _resume(root)
    assert "no intact checkpoint" in out["error"]
    assert "iter_0000002 is damaged: dist/__0_0.distcp: sha256" in out["error"]
    assert "iter_0000001 is damaged: trainer_state.json" in out["error"]
    # a damaged checkpoint named explicitly is refused, not replaced by another one
    root2 = _copy(saved, tmp_path / "explicit")
    _flip(_largest_shard(os.path.join(root2, "iter_0000002")))
    out = _resume(root2, os.path.join(root2, "iter_0000002"))
    assert "iter_0000002 is damaged" in out["error"] and out["warnings"] == []


def test_checkpoint_without_manifest_loads_with_warning(saved, tmp_path):
    root = _copy(saved, tmp_path)
    os.remove(os.path.join(root, "iter_0000002", "manifest.json"))
    out = _resume(root)
    assert out["path"].endswith("iter_0000002") and out["sums"] == saved["sums"][2]
    assert len(out["warnings"]) == 1 and "no manifest.json" in out["warnings"][0]
