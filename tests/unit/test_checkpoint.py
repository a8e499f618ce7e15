"""Checkpoints: round trip of model + optimizer + RNG, `latest`, keep-last-N, stale tmp dirs,
and kill -9 during a write leaving the previous checkpoint loadable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from dist_utils import run_distributed

pytestmark = pytest.mark.distributed

# Shared by the in-process workers and the kill -9 subprocess script.
HELPERS = textwrap.dedent(
    """
    import torch
    from rlrt_megatron import platform
    from rlrt_megatron.config import OptimizerConfig
    from rlrt_megatron.convert.tiny import tiny_config
    from rlrt_megatron.megatron.train_step import Policy

    def make_policy():
        platform.init_distributed(1, 1, seed=5)
        cfg = tiny_config(vocab_size=256)
        return Policy(cfg, tp=1, pp=1, optim=OptimizerConfig(lr=1e-2), total_steps=10)

    def train_step(policy):
        seqs, starts = [list(range(3, 15)), list(range(20, 30))], [5, 3]  # 7 response tokens
        loss_of = lambda lp, rows, tk: (-lp.sum() / 14.0, {})
        policy.train_minibatch(seqs, starts, [0, 1], 7, 64, loss_of)

    def params(policy):
        return {n: p.detach().clone() for n, p in policy.chunks[0].named_parameters()}

    def opt_state(policy):
        # the Adam moments and step counts of this rank's parameter shards
        out = []
        for opt in policy.optimizer.chained_optimizers:
            for st in opt.optimizer.state.values():
                for k in sorted(st):
                    out.append(torch.as_tensor(st[k]).detach().clone().float().flatten())
        return torch.cat(out)
    """
)
exec(HELPERS)  # noqa: S102 - the same helpers in this process (for spawn pickling by name)


def _round_trip(rank: int, world: int, root: str) -> dict:
    import torch

    from rlrt_megatron.trainer.checkpoint import Checkpointer

    policy = make_policy()  # noqa: F821 - from HELPERS
    train_step(policy)  # noqa: F821
    hf = root + "_hf"
    os.makedirs(hf)
    with open(os.path.join(hf, "config.json"), "w") as f:
        f.write("{}")
    ck = Checkpointer(root, keep_last=2, hf_dir=hf)
    teacher = policy.make_teacher_copy()
    saved_teacher = {n: p.detach().clone() for n, p in teacher[0].named_parameters()}
    saved_params = params(policy)  # noqa: F821
    saved_opt = opt_state(policy)  # noqa: F821
    path = ck.save(1, policy.model, policy.optimizer, {"sampler": {"cursor": 3}}, teacher=teacher)
    hf_copied = os.path.isfile(os.path.join(path, "hf", "config.json"))
    expect_rand = torch.rand(4)  # the RNG stream right after the save
    train_step(policy)  # noqa: F821 - move away from the saved state
    expect_next = params(policy)  # noqa: F821 - one optimizer step after the save
    train_step(policy)  # noqa: F821
    assert any(not torch.equal(saved_params[n], p) for n, p in params(policy).items())  # noqa: F821
    with torch.no_grad():
        for p in teacher[0].parameters():
            p.zero_()
    state = ck.load(ck.latest(), policy.model, policy.optimizer, teacher=teacher)
    same_teacher = all(torch.equal(saved_teacher[n], p) for n, p in teacher[0].named_parameters())
    after = params(policy)  # noqa: F821
    same_params = all(torch.equal(saved_params[n], after[n]) for n in saved_params)
    same_opt = torch.equal(saved_opt, opt_state(policy))  # noqa: F821
    same_rng = torch.equal(expect_rand, torch.rand(4))
    train_step(policy)  # noqa: F821 - Adam moments and step count restored: same next step
    same_next = all(torch.equal(expect_next[n], p) for n, p in params(policy).items())  # noqa: F821
    for step in (2, 3):
        ck.save(step, policy.model, policy.optimizer, {})
    os.makedirs(os.path.join(root, "iter_0000004.tmp", "dist"))  # a crashed save
    latest_with_stale_tmp = ck.latest()
    ck.save(5, policy.model, policy.optimizer, {})
    return {
        "path": path,
        "state": state,
        "same_params": same_params,
        "same_opt": same_opt,
        "same_rng": same_rng,
        "same_next": same_next,
        "same_teacher": same_teacher,
        "hf_copied": hf_copied,
        "latest_with_stale_tmp": latest_with_stale_tmp,
        "listing": sorted(os.listdir(root)),
    }


def test_round_trip_latest_keep_last(tmp_path):
    root = str(tmp_path / "ckpt")
    (res,) = run_distributed(_round_trip, 1, root)
    assert res["same_params"] and res["same_opt"] and res["same_rng"] and res["same_next"]
    assert res["same_teacher"] and res["hf_copied"]
    assert res["state"]["step"] == 1 and res["state"]["sampler"] == {"cursor": 3}
    assert res["latest_with_stale_tmp"].endswith("iter_0000003")
    # keep_last=2, the stale tmp dir removed by the next save
    assert res["listing"] == ["iter_0000003", "iter_0000005", "latest"]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000005"


KILL_SCRIPT = HELPERS + textwrap.dedent(
    """
    import json, os, signal, sys
    from rlrt_megatron.trainer.checkpoint import Checkpointer

    root, mode = sys.argv[1], sys.argv[2]
    policy = make_policy()
    ck = Checkpointer(root, keep_last=3)
    if mode == "write":
        train_step(policy)
        ck.save(1, policy.model, policy.optimizer, {"note": "first"})
        sums = {n: float(p.double().sum()) for n, p in params(policy).items()}
        json.dump(sums, open(os.path.join(root, "..", "sums.json"), "w"))
        train_step(policy)
        # die hard after the shards of iter 2 are on disk, before the rename / `latest`
        ck.before_commit = lambda tmp: os.kill(os.getpid(), signal.SIGKILL)
        ck.save(2, policy.model, policy.optimizer, {"note": "second"})
        print("unreachable")
    else:
        path = ck.latest()
        state = ck.load(path, policy.model, policy.optimizer)
        sums = {n: float(p.double().sum()) for n, p in params(policy).items()}
        print(json.dumps({"path": path, "state": state, "sums": sums}))
    """
)


def _run(prefix, args: list[str], env: dict) -> subprocess.CompletedProcess:
    """Run KILL_SCRIPT in its own session; afterwards kill what it left behind (the
    checkpoint writer's helper processes outlive a SIGKILLed parent)."""
    out, err = open(f"{prefix}.out", "w+"), open(f"{prefix}.err", "w+")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, *args], stdout=out, stderr=err, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        rc = proc.wait(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    out.seek(0)
    err.seek(0)
    return subprocess.CompletedProcess(proc.args, rc, out.read(), err.read())


def test_kill_9_during_write_leaves_previous_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    write = _run(tmp_path / "write", [str(root), "write"], env)
    assert write.returncode == -signal.SIGKILL, write.stderr[-2000:]
    assert "unreachable" not in write.stdout
    assert (root / "iter_0000002.tmp").is_dir()  # the interrupted write
    assert (root / "latest").read_text().strip() == "iter_0000001"
    load = _run(tmp_path / "load", [str(root), "load"], env)
    assert load.returncode == 0, load.stderr[-2000:]
    out = json.loads(load.stdout.strip().splitlines()[-1])
    assert out["path"].endswith("iter_0000001") and out["state"]["note"] == "first"
    assert out["sums"] == json.loads((tmp_path / "sums.json").read_text())


def _fsync_worker(rank: int, world: int, root: str) -> dict:
    """Save at TP = 2 with every `os.fsync` of this process (and of the writer processes it
    forks) appended to `fsync_rank<R>.txt`; rank 0 reads rank 1's list when it is about to rename
    (after the barrier)."""
    from rlrt_megatron import platform
    from rlrt_megatron.config import OptimizerConfig
    from rlrt_megatron.convert.tiny import tiny_config
    from rlrt_megatron.megatron.train_step import Policy
    from rlrt_megatron.trainer.checkpoint import Checkpointer

    platform.init_distributed(2, 1, seed=5)
    policy = Policy(tiny_config(vocab_size=256), tp=2, pp=1, optim=OptimizerConfig(lr=1e-2),
                    total_steps=10, use_distributed_optimizer=False)  # fmt: skip
    log = os.path.join(root, f"fsync_rank{rank}.txt")
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        with open(log, "a") as f:
            f.write(os.readlink(f"/proc/self/fd/{fd}") + "\n")
        real_fsync(fd)

    seen: dict[str, list[str]] = {}

    def before_commit(tmp: str) -> None:
        with open(os.path.join(root, "fsync_rank1.txt")) as f:
            seen["rank1_at_rename"] = [os.path.relpath(p, tmp) for p in f.read().split()]
        seen["tmp_files"] = sorted(
            os.path.relpath(os.path.join(d, n), tmp) for d, _, ns in os.walk(tmp) for n in ns
        )

    ck = Checkpointer(os.path.join(root, "ckpt"), keep_last=0)
    ck.before_commit = before_commit
    os.fsync = recording_fsync
    try:
        path = ck.save(1, policy.model, policy.optimizer, {})
    finally:
        os.fsync = real_fsync
    with open(log) as f:
        mine = [os.path.relpath(p, path + ".tmp") for p in f.read().split()]
    return {**seen, "mine": mine}


def test_each_rank_fsyncs_its_own_files(tmp_path):
    """On a network file system an fsync from another client does not flush the writer's pages:
    every rank fsyncs the files it wrote (its shards, its RNG file) and the directories holding
    them before the barrier that precedes the rename; rank 0 fsyncs no other rank's file."""
    r0, r1 = run_distributed(_fsync_worker, 2, str(tmp_path))
    files = r0["tmp_files"]
    shards = {r: [f for f in files if os.path.basename(f).startswith(f"__{r}_")] for r in (0, 1)}
    assert shards[0] and shards[1], files  # both TP ranks wrote shard files
    ones = set(shards[1]) | {"rng_rank1.pt"}
    # rank 1 had fsynced its own files and both directories when rank 0 came to rename
    assert ones <= set(r0["rank1_at_rename"]), (ones, r0["rank1_at_rename"])
    assert {".", "dist"} <= set(r0["rank1_at_rename"]), r0["rank1_at_rename"]
    assert not ones & set(r0["mine"]), r0["mine"]  # rank 0 left them alone
    zeros = set(shards[0]) | {"rng_rank0.pt", "trainer_state.json", "dist/.metadata"}
    assert zeros <= set(r0["mine"]), (zeros, r0["mine"])
    assert not (set(files) - ones) & set(r1["mine"]), r1["mine"]  # and rank 1 rank 0's


def _gather_worker(rank: int, world: int, root: str) -> dict:
    """Save at DP = 2 with the distributed optimizer, recording the fp32 optimizer state that
    megatron's gather hands each rank (`get_parameter_state_dp_zero`) and how it gathers."""
    import torch
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from rlrt_megatron import platform
    from rlrt_megatron.config import OptimizerConfig
    from rlrt_megatron.convert.tiny import tiny_config
    from rlrt_megatron.megatron.train_step import Policy
    from rlrt_megatron.trainer.checkpoint import Checkpointer

    platform.init_distributed(1, 1, seed=5)
    policy = Policy(tiny_config(vocab_size=256), tp=1, pp=1, optim=OptimizerConfig(lr=1e-2),
                    total_steps=10, use_distributed_optimizer=True)  # fmt: skip
    train_step(policy)  # noqa: F821 - from HELPERS
    calls: list[dict] = []
    real = DistributedOptimizer.get_parameter_state_dp_zero

    def recording(self, **kw):  # noqa: ANN001, ANN003, ANN202
        out = real(self, **kw)
        held = 0
        for per_dtype in (out or {}).values():
            if isinstance(per_dtype, dict):
                for world_tensors in per_dtype.values():
                    held += sum(t.numel() * t.element_size() for t in world_tensors.values()
                                if torch.is_tensor(t))  # fmt: skip
        calls.append({**kw, "bytes": held})
        return out

    DistributedOptimizer.get_parameter_state_dp_zero = recording
    try:
        Checkpointer(root, keep_last=0).save(1, policy.model, policy.optimizer, {})
    finally:
        DistributedOptimizer.get_parameter_state_dp_zero = real
    n_params = sum(p.numel() for p in policy.chunks[0].parameters())
    return {
        "calls": calls,
        "n_params": n_params,
        "n_tensors": len(list(policy.chunks[0].parameters())),
    }


def test_optimizer_save_gathers_on_dp_rank_0_only(tmp_path):
    """The fully reshardable optimizer save uses megatron's memory-efficient variant: the fp32
    state of the TP x PP shard (param, exp_avg, exp_avg_sq: 12 bytes per parameter, as `rlrt
    plan` counts it) is gathered over gloo onto data-parallel rank 0 only, the rank that writes
    it; the default variant all-gathers it (through the GPU) onto every data-parallel rank."""
    r0, r1 = run_distributed(_gather_worker, 2, str(tmp_path / "ckpt"))
    for r in (r0, r1):
        assert [(c["use_gloo_comm"], c["return_on_all_ranks"]) for c in r["calls"]] == [
            (True, False)
        ], r["calls"]
    assert r1["calls"][0]["bytes"] == 0
    n, k = r0["n_params"], r0["n_tensors"]
    # megatron aligns each parameter's start to 64 elements inside the buffer
    assert 12 * n <= r0["calls"][0]["bytes"] <= 12 * (n + 64 * k), (r0, n)
