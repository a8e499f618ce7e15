"""ProcessEngine: the local engine in its own process gives what the in-process engine gives
(completions, weight updates, teacher-forced scores), runs beside the caller, reports failures."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from rlrt_megatron.rollout.base import GenerateRequest, SamplingParams
from rlrt_megatron.rollout.local import LocalEngine
from rlrt_megatron.rollout.process import ProcessEngine, RolloutProcessError

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from rlrt_megatron.convert.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "hf", seed=0))


@pytest.fixture(scope="module")
def engines(model_dir):
    local = LocalEngine(model_dir, seed=0)
    proc = ProcessEngine(model_dir_or_model=model_dir, seed=0, num_threads=1)
    yield local, proc
    proc.shutdown()


def _requests(engine) -> list[GenerateRequest]:
    tok = engine.tokenizer
    return [
        GenerateRequest(tok.encode(t), request_id=str(i)) for i, t in enumerate(["1+2=", "7*3="])
    ]


def test_generate_and_update_match_the_in_process_engine(engines):
    local, proc = engines
    reqs, sp = _requests(local), SamplingParams(n=3, max_new_tokens=8, seed=5)
    a, b = local.generate(reqs, sp), proc.generate(reqs, sp)
    assert [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]
    assert [[c.logprobs for c in g] for g in a] == [[c.logprobs for c in g] for g in b]
    g = torch.Generator().manual_seed(1)
    new = [(n, p.detach() + 0.05 * torch.randn(p.shape, generator=g)) for n, p in
           local.model.named_parameters()]  # fmt: skip
    local.update_weights(new, version=3)
    proc.update_weights(new, version=3)
    assert proc.weight_version == 3
    a, b = local.generate(reqs, sp), proc.generate(reqs, sp)
    assert [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]
    assert all(c.weight_version == 3 for grp in b for c in grp)
    # teacher-forced scores equal the sampling log-probs of the same tokens
    prompts = [c.prompt_token_ids for grp in b for c in grp]
    responses = [c.token_ids for grp in b for c in grp]
    scores = proc.score(prompts, responses)
    for c, s in zip([c for grp in b for c in grp], scores, strict=True):
        torch.testing.assert_close(torch.tensor(s), torch.tensor(c.logprobs), atol=1e-4, rtol=0)


def test_generation_runs_beside_the_caller(engines):
    local, proc = engines
    reqs = _requests(local) * 8
    sp = SamplingParams(n=4, max_new_tokens=32, seed=0)
    box: dict = {}
    th = threading.Thread(target=lambda: box.setdefault("out", proc.generate(reqs, sp)))
    th.start()
    busy = 0.0
    while th.is_alive():  # the caller's thread computes while the child generates (no GIL held)
        t = time.perf_counter()
        torch.randn(64, 64) @ torch.randn(64, 64)
        busy += time.perf_counter() - t
    th.join()
    assert len(box["out"]) == len(reqs) and busy > 0


def test_errors_come_back_and_a_dead_child_is_reported(model_dir):
    eng = ProcessEngine(model_dir_or_model=model_dir, seed=0)
    with pytest.raises(RolloutProcessError, match="unknown parameter"):
        eng.update_weights([("nope.weight", torch.zeros(2))], version=1)
    assert eng.health() and eng.weight_version == 0  # still serving
    eng._proc.kill()
    eng._proc.join()
    with pytest.raises(RolloutProcessError, match="died"):
        eng.generate(_requests(LocalEngine(model_dir)), SamplingParams(max_new_tokens=2))
    assert not eng.health()
    eng.shutdown()


def test_async_config_validation():
    from rlrt_megatron.config import ConfigError, TrainConfig

    def check(*ov):
        return TrainConfig().override(["model.build_tiny=true", *ov]).validate()

    assert check("rollout.async_steps=1").rollout.async_steps == 1
    with pytest.raises(ConfigError, match="must be 0 or 1"):
        check("rollout.async_steps=2")
    with pytest.raises(ConfigError, match="colocated SGLang servers"):
        check("rollout.async_steps=1", "rollout.engine=sglang")
    check("rollout.async_steps=1", "rollout.engine=sglang", "rollout.sglang_colocated=false")


def test_sync_tolerance_defaults_by_dtype():
    from rlrt_megatron.config import TrainConfig
    from rlrt_megatron.trainer.rollouts import SYNC_TOL_BF16, SYNC_TOL_FP32, sync_tol

    cfg = TrainConfig().override(["model.params_dtype=float32", "rollout.local_dtype=float32"])
    assert sync_tol(cfg) == SYNC_TOL_FP32
    assert sync_tol(cfg.override(["rollout.local_dtype=bfloat16"])) == SYNC_TOL_BF16
    assert sync_tol(cfg.override(["rollout.engine=sglang", "rollout.local_dtype=float32"])) == (
        SYNC_TOL_BF16
    )
    assert sync_tol(cfg.override(["rollout.sync_check_tol=0.5"])) == 0.5
    assert sync_tol(cfg.override(["rollout.sync_check_tol=-1"])) == -1
