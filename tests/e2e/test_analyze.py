"""`rlrt analyze` on the tiny model: log-probs, JSD, and the PNGs + analysis.json."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from rlrt_megatron.cli import main

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny policy, base = the policy with seeded noise on every weight)."""
    from transformers import AutoModelForCausalLM

    from rlrt_megatron.convert.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("analyze_models")
    policy = make_tiny_model(root / "policy")
    base = root / "base"
    shutil.copytree(policy, base)
    m = AutoModelForCausalLM.from_pretrained(base)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=gen))
    m.save_pretrained(base)
    return policy, base


def test_logprobs_match_engine_and_jsd_properties(models) -> None:
    from transformers import AutoModelForCausalLM

    from rlrt_megatron.algorithms.losses import generalized_jsd
    from rlrt_megatron.data.templates import render_prompt
    from rlrt_megatron.eval.analyze import (
        policy_base_divergence,
        response_logits,
        sampled_logprobs,
    )
    from rlrt_megatron.rollout.base import GenerateRequest, SamplingParams
    from rlrt_megatron.rollout.local import LocalEngine

    policy_dir, base_dir = models
    engine = LocalEngine(policy_dir)
    tok, model = engine.tokenizer, engine.model
    prompt = render_prompt(tok, "What is 3 + 4?").token_ids
    (c,) = engine.generate(
        [GenerateRequest(prompt)], SamplingParams(n=1, max_new_tokens=12, seed=5)
    )[0]
    lp = sampled_logprobs(model, prompt, c.token_ids, len(tok))
    # temperature 1: the engine's behavior log-probs are the model's raw log-probs
    assert torch.allclose(lp, torch.tensor(c.logprobs), atol=1e-4)

    same, ov = policy_base_divergence(model, model, prompt, c.token_ids, len(tok), ks=(1, 5))
    assert same.shape == (len(c.token_ids),) and float(same.abs().max()) < 1e-6
    assert all(bool((v == 1.0).all()) for v in ov.values())

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    jsd, ov = policy_base_divergence(model, base, prompt, c.token_ids, len(tok), ks=(1, 5))
    assert bool((jsd > 0).all()) and float(jsd.max()) <= math.log(2) + 1e-6
    # position 0 against the mixture formula written out
    v = len(tok)  # ids >= v are padded embedding rows with -inf logits
    p = torch.log_softmax(response_logits(model, prompt, c.token_ids, v)[0, :v], -1).exp()
    b = torch.log_softmax(response_logits(base, prompt, c.token_ids, v)[0, :v], -1).exp()
    m = (p + b) / 2
    direct = 0.5 * (p * (p / m).log()).sum() + 0.5 * (b * (b / m).log()).sum()
    assert float(jsd[0]) == pytest.approx(float(direct), rel=1e-4)
    assert float(generalized_jsd(p.log(), b.log())) == pytest.approx(float(direct), rel=1e-4)
    assert all(bool(((v >= 0) & (v <= 1)).all()) for v in ov.values())


def test_analyze_cli_writes_pngs_and_json(models, tmp_path, capsys) -> None:
    policy, base = models
    out = tmp_path / "an"
    argv = [
        "analyze",
        "--ckpt",
        str(policy),
        "--base",
        str(base),
        "--benchmarks",
        "synthetic",
        "--max-problems",
        "3",
        "--k",
        "4",
        "--max-new-tokens",
        "16",
        "--reward-workers",
        "1",
        "--reward-timeout",
        "600",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "explore / exploit tokens" in text and "reflection injection" in text
    names = [
        "delta_trace.png",
        "delta_hist.png",
        "explore_exploit_tokens.png",
        "reflection_flips.png",
        "jsd.png",
    ]
    for name in names:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    res = json.loads((out / "analysis.json").read_text())
    assert res["rollouts"] == 12
    # peer-or-reference: every rollout has a teacher
    assert res["delta"]["stats"]["rollouts_with_teacher"] == 12
    assert res["delta"]["explore"] and res["delta"]["exploit"]
    assert res["delta"]["explore"][0]["mean_w"] >= res["delta"]["exploit"][0]["mean_w"]
    for kind in ("max_delta", "random", "min_delta"):
        r = res["reflection"][kind]
        assert r["n_right"] + r["n_wrong"] == 12
        for key in ("flipR", "flipW"):
            assert r[key] is None or 0.0 <= r[key] <= 1.0
    j = res["jsd"]
    assert j["n_tokens"] > 0 and 0 < j["mean_jsd"] <= math.log(2)
    fracs = [j["frac_above"][t] for t in ("0.01", "0.05", "0.1", "0.3")]
    assert fracs == sorted(fracs, reverse=True) and all(0 <= f <= 1 for f in fracs)
    assert set(j["topk_overlap"]) == {"1", "5", "10"}


@pytest.mark.slow  # make test-slow (run by .ci/run): keeps make test < 15 min
def test_eval_and_analyze_on_the_sft_warmed_demo_model(tiny_model, tmp_path, capsys) -> None:
    """The demo's SFT-warmed tiny model (right ~1/3 of the time; the session's `tiny_model`,
    warmed once for every e2e test): eval numbers, peer teachers, explore tokens on correct
    rollouts, and a large JSD from its random base (the same seed's weights before the warm-up).
    """
    from rlrt_megatron.convert.tiny import make_tiny_model

    warm = Path(tiny_model["hf"])
    seed = json.loads((warm / "rlrt_sft.json").read_text())["config"]["seed"]  # its warm-up's
    base = make_tiny_model(tmp_path / "base", seed=seed)  # the weights before the warm-up
    common = ["--benchmarks", "synthetic", "--instruction", "", "--reward-workers", "1"]
    common += ["--max-new-tokens", "48", "--reward-timeout", "600"]
    assert (
        main(
            [
                "eval",
                "--ckpt",
                str(warm),
                "--k",
                "4",
                "--temperature",
                "1.0",
                "--top-p",
                "1.0",
                "--out",
                str(tmp_path / "eval"),
                *common,
            ]
        )
        == 0
    )
    row = json.loads((tmp_path / "eval" / "summary.json").read_text())["benchmarks"]["synthetic"]
    assert 0.1 < row["avg@4"] < row["pass@4"] <= 1.0
    out = tmp_path / "an"
    argv = ["analyze", "--ckpt", str(warm), "--base", str(base), "--max-problems", "8"]
    argv += ["--k", "4", "--teacher", "peer", "--out", str(out), *common]
    assert main(argv) == 0
    res = json.loads((out / "analysis.json").read_text())
    st = res["delta"]["stats"]
    assert st["rollouts_peer_teacher"] == st["rollouts_with_teacher"] > 0
    assert res["delta"]["scope"] == "correct"
    assert res["delta"]["explore"][0]["mean_delta"] < 0 < res["delta"]["explore"][0]["count"]
    assert res["jsd"]["mean_jsd"] > 0.1 and res["jsd"]["topk_overlap"]["1"] < 0.5
    for name in ("delta_trace", "delta_hist", "explore_exploit_tokens", "reflection_flips", "jsd"):
        assert (out / f"{name}.png").stat().st_size > 10_000
