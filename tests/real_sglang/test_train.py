"""`rlrt train --recipe tiny_demo rollout.engine=sglang` end to end on the CPU, each run with its
own real SGLang server: synchronous (with the API key checked: never on a command line, never in
a file under the run dir), asynchronous (rollout.async_steps=1) and partial rollouts (abort +
continue, max_staleness=2); the sync check failing the step when a weight push is skipped;
`rlrt eval --engine sglang` greedy == `--engine local`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dist_utils import run_distributed
from sglang_env import CPU_ARGS, REPO, SERVER_ENV, SGLANG_PYTHON

pytestmark = pytest.mark.sglang

KEY = "rlrt-test-key-5c0ffee1d"
STEPS = 6
FAST = [
    "rollout.group_size=4", "rollout.max_new_tokens=24", "train.prompts_per_step=4",
    "train.mini_batch_prompts=2", "data.synthetic_size=256", "logging.console=none",
    "logging.tensorboard=false", "checkpoint.save_every=0", "checkpoint.save_final=false",
    "checkpoint.resume=none", "eval.every=0",
]  # fmt: skip
SGLANG = [
    "rollout.engine=sglang", f"rollout.sglang_python={SGLANG_PYTHON}",
    "rollout.sglang_dtype=float32", "rollout.sglang_colocated=false",
    "rollout.sglang_num_servers=1", "rollout.sglang_extra_args=" + ",".join(CPU_ARGS),
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model() -> dict[str, str]:
    """The SFT-warmed tiny model (HF + Megatron), as the e2e tier builds it; kept under runs/
    (rebuilt only when its recipe changes) so a rerun of the tier skips the warm-up."""
    from recipes import get_recipe
    from rlrt_megatron.trainer.cli import _prepare_demo_model

    root = REPO / "runs" / "test-cache" / "sglang_tiny_model"
    _prepare_demo_model(get_recipe("tiny_demo", ["model.sft_warmup_steps=300"]), str(root))
    return {"hf": os.path.join(root, "hf"), "megatron": os.path.join(root, "megatron")}


def overrides(tiny_model: dict, run_dir: Path, *extra: str) -> list[str]:
    return [
        *FAST, *SGLANG, f"model.hf_path={tiny_model['hf']}",
        f"model.megatron_ckpt={tiny_model['megatron']}", f"logging.run_dir={run_dir}", *extra,
    ]  # fmt: skip


def trainer_env() -> dict[str, str]:
    """The trainer's environment; its SGLang server inherits it (CPU engine, sgl_kernel)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["SGLANG_USE_CPU_ENGINE"] = SERVER_ENV["SGLANG_USE_CPU_ENGINE"]
    env["PYTHONPATH"] = f"{REPO}:{SERVER_ENV['PYTHONPATH']}"
    return env


def _cmdlines_with(text: str) -> list[str]:
    hits = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    line = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in line:
                hits.append(f"{pid}: {line[:300]}")
    return hits


def train(tiny_model: dict, run_dir: Path, *extra: str, steps: int = STEPS) -> list[dict]:
    """Run `rlrt train` to the end; while it runs, no command line may hold the API key."""
    cmd = [
        sys.executable, "-m", "rlrt_megatron.cli", "train", "--recipe", "tiny_demo",
        *overrides(tiny_model, run_dir, f"train.steps={steps}", *extra),
    ]  # fmt: skip
    env = {**trainer_env(), "RLRT_ROLLOUT_API_KEY": KEY}
    leaks: list[str] = []
    with open(run_dir.parent / f"{run_dir.name}.err", "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
        while proc.poll() is None:  # the server's and the trainer's argv, all run long
            leaks += _cmdlines_with(KEY)
            time.sleep(0.5)
    log = (run_dir.parent / f"{run_dir.name}.err").read_text()
    assert proc.returncode == 0, log[-4000:]
    assert not leaks, leaks
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def check_run(rows: list[dict], run_dir: Path, async_steps: int) -> None:
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert "reward/mean" in r and 0.0 <= r["reward/mean"] <= 1.0
        assert r["rollout/version"] == r["step"]  # weights pushed after every step
        assert r.get("rollout/staleness_max", 0.0) <= async_steps
        # served vs Megatron log-probs of the same tokens under the same weights: the batch
        # itself (synchronous; asynchronous step 1), else the engine's score of the next
        # batch's first rows right after the push (SGLangEngine.score)
        assert r["rollout/sync_check_abs_diff"] < 1e-3, r
        assert r["rollout/logprob_abs_diff"] < 1e-3, r
        # asynchronous steps >= 2 sample with the previous weights: the one-step policy change
        # is logged apart (and is far above an engine error)
        if async_steps and r["step"] >= 2:
            assert r["rollout/stale_logprob_abs_diff"] > 1e-3, r
    # the key reached the server (it answered us) yet no file under the run dir holds it
    assert (run_dir / "sglang_logs" / "server0.log").is_file()
    for root, _, files in os.walk(run_dir):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert KEY.encode() not in f.read(), os.path.join(root, name)


def test_train_with_sglang_end_to_end(tiny_model, tmp_path):
    run_dir = tmp_path / "sync"
    rows = train(tiny_model, run_dir)
    check_run(rows, run_dir, async_steps=0)
    assert "<redacted>" in (run_dir / "sglang_logs" / "server0.log").read_text()


def test_train_with_sglang_async(tiny_model, tmp_path):
    run_dir = tmp_path / "async"
    rows = train(tiny_model, run_dir, "rollout.async_steps=1")
    check_run(rows, run_dir, async_steps=1)
    assert max(r["rollout/staleness_max"] for r in rows if "rollout/staleness_max" in r) == 1


PARTIAL = ("train.steps=4", "rollout.max_staleness=2", "rollout.partial=true")
PARTIAL_KEYS = (
    "rollout/staleness_max", "rollout/logprob_abs_diff", "rollout/partial_resumed_rows",
    "rollout/partial_decoded_rows", "rollout/partial_restarted", "response/length_mean",
)  # fmt: skip


def _train_partial(rank: int, world: int, model: dict, run_dir: str) -> list[dict]:
    """`rlrt train ... rollout.partial=true` in this process (the CLI's `train(cfg)`), with a
    test hook that makes rollouts reliably interrupted: the warmed model stops every rollout at
    ~15-24 tokens, so the groups of a round finish within a few decode steps of each other and
    an abort (~ms) may land after all of them. Step 1's prompts 0-3 (the first batch) get at
    most 4 new tokens, and so do step 1's rollouts when continued (round 2): those groups finish
    far ahead of the others, whose rollouts the abort then cuts (rounds 1 and 2, weights v0)
    and round 3 resumes under v1. The cap changes no log-prob (it only ends the rollout)."""
    os.environ.update(trainer_env())
    from recipes import get_recipe
    from rlrt_megatron.rollout.sglang import partial
    from rlrt_megatron.trainer.train import train as run_train

    orig = partial._payload

    def short_first(item, sampling, budget, rid):
        payload = orig(item, sampling, budget, rid)
        _, _, tokens, seed, request, _ = item
        if seed == 1 and (request < 4 or tokens):  # rollout.seed 0 + step 1
            payload["sampling_params"]["max_new_tokens"] = min(4, budget)
        return payload

    partial._payload = short_first
    run_train(get_recipe("tiny_demo", overrides(model, Path(run_dir), *PARTIAL)))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_train_with_sglang_partial_rollouts(tiny_model, tmp_path):
    """Partial rollouts on SGLang (abort + continue, rollout/sglang/partial.py) through the
    trainer's queue: every step within the staleness bound, served == Megatron log-probs under
    the same weights, and rollouts interrupted in one round resumed under newer weights."""
    (rows,) = run_distributed(_train_partial, 1, tiny_model, str(tmp_path / "partial"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    seen = {k: [r.get(k) for r in rows] for k in PARTIAL_KEYS}
    print(f"\nsglang partial rollouts: {seen}")
    for r in rows:
        assert 0.0 <= r["reward/mean"] <= 1.0 and r["rollout/version"] == r["step"]
        assert r["rollout/staleness_max"] <= 2, r
        assert r["rollout/logprob_abs_diff"] < 1e-3, r
    assert max(seen["rollout/partial_resumed_rows"]) > 0, seen


def _train_skipping_push(rank: int, world: int, model: dict, run_dir: str) -> str:
    """In-process run whose engine drops the push of version 2 (the server keeps version 1)."""
    os.environ.update(trainer_env())
    from recipes import get_recipe
    from rlrt_megatron.rollout.sglang import SGLangEngine
    from rlrt_megatron.trainer.train import train as run_train

    orig = SGLangEngine.update_weights

    def skip_two(self, named, version, servers=None):
        if version == 2:
            for _ in named:  # consumed like a real push, nothing sent
                pass
            self._version = version
            return {"bytes": 0, "seconds": 0.0, "buckets": 0, "checked": 0}
        return orig(self, named, version, servers)

    SGLangEngine.update_weights = skip_two
    cfg = get_recipe("tiny_demo", overrides(model, Path(run_dir), "train.steps=4"))
    try:
        run_train(cfg)
    except Exception as e:  # noqa: BLE001 - the test reads it
        return f"{type(e).__name__}: {e}"
    return "no error"


def test_sync_check_fails_the_step_on_a_skipped_push(tiny_model, tmp_path):
    (err,) = run_distributed(_train_skipping_push, 1, tiny_model, str(tmp_path / "skip"))
    assert err.startswith("SyncCheckError"), err
    assert "step 3" in err and "version 1..1" in err and "holds version 2" in err, err


def test_eval_sglang_greedy_equals_local(tiny_model, tmp_path):
    def run(engine: str, *extra: str) -> dict:
        out = tmp_path / engine
        cmd = [
            sys.executable, "-m", "rlrt_megatron.cli", "eval", "--ckpt", tiny_model["hf"],
            "--benchmarks", "synthetic", "--k", "2", "--max-problems", "8",
            "--max-new-tokens", "24", "--temperature", "0", "--reward-workers", "1",
            "--reward-timeout", "600", "--save-responses", "--out", str(out),
            "--engine", engine, *extra,
        ]  # fmt: skip
        done = subprocess.run(cmd, env=trainer_env(), capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stderr[-4000:]
        rows = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()][1:]
        summary = json.loads((out / "summary.json").read_text())
        return {"rows": {r["uid"]: r for r in rows}, "summary": summary}

    local = run("local", "--dtype", "fp32")
    served = run(
        "sglang", f"--sglang-python={SGLANG_PYTHON}", "--sglang-dtype=float32",
        *[f"--sglang-arg={a}" for a in CPU_ARGS],
    )  # fmt: skip
    assert served["rows"].keys() == local["rows"].keys() and len(local["rows"]) == 8
    for uid, row in local["rows"].items():
        assert served["rows"][uid]["responses"] == row["responses"], uid
    rows = [r["summary"]["benchmarks"]["synthetic"] for r in (local, served)]
    assert [r["avg@2"] for r in rows] == [rows[0]["avg@2"]] * 2 and rows[0]["n_problems"] == 8
