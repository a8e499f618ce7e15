"""Partial rollouts on the real local engine (`rollout/partial.py`): a rollout interrupted when
another group finishes, then resumed after a weight push, keeps the old version and the old
behavior log-probs for its first tokens and gets the new ones for the rest; TIS weights each token
with its own behavior policy; a group older than the staleness bound is regenerated."""

from __future__ import annotations

import pytest
import torch

from rlrt_megatron.algorithms.correction import rollout_correction
from rlrt_megatron.convert.tiny import build_tokenizer, randomize_weights, tiny_config
from rlrt_megatron.data.templates import render_prompt
from rlrt_megatron.rollout.base import GenerateRequest, SamplingParams
from rlrt_megatron.rollout.local import LocalEngine, length_cap
from rlrt_megatron.rollout.partial import batch_payload, new_group, run_round
from rlrt_megatron.rollout.process import score_tokens

SP = SamplingParams(n=1, temperature=1.0, max_new_tokens=12, seed=7)


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer(vocab_size=512, seed=0, n_texts=400)
    model = AutoModelForCausalLM.from_config(
        tiny_config("qwen3", vocab_size=512, tied=True, tokenizer=tok), dtype=torch.float32
    )
    randomize_weights(model, 0, std=0.2)
    engine = LocalEngine(model.eval(), tok, seed=0)
    engine.eos_token_ids = []  # every rollout runs to max_new_tokens: lengths are known
    prompts = [render_prompt(tok, p).token_ids for p in ("1 + 2 = ?", "7 * 3 = ?")]
    return engine, prompts


def _new_weights(engine: LocalEngine, seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (n, p.detach() + 0.05 * torch.randn(p.shape, generator=g))
        for n, p in engine.model.named_parameters()
    ]


def test_interrupted_rollout_keeps_each_tokens_version_and_behavior(setup):
    engine, (pa, pb) = setup
    engine.update_weights(_new_weights(engine, 1), version=3)
    w3 = [(n, p.detach().clone()) for n, p in engine.model.named_parameters()]
    short = new_group(10, pa, SP.seed, 0, 1)  # 10 of its 12 tokens already sampled
    row = short.rows[0]
    row.tokens, row.logprobs, row.versions = [5] * 10, [-1.0] * 10, [3] * 10
    long = new_group(11, pb, SP.seed, 1, 1)
    done, left, info = run_round(engine, [short, long], SP, batch_groups=1, oldest_allowed=3)
    assert [g.idx for g in done] == [10] and [g.idx for g in left] == [11]
    cut = left[0].rows[0]
    assert cut.reason is None and len(cut.tokens) == 2  # interrupted when the short one ended
    assert cut.versions == [3, 3]

    engine.update_weights(_new_weights(engine, 2), version=4)  # the weight push
    done, left, info = run_round(engine, left, SP, batch_groups=1, oldest_allowed=3)
    assert left == [] and info["rollout/partial_resumed_rows"] == 1.0
    row = done[0].rows[0]
    assert row.reason == "length" and len(row.tokens) == 12
    assert row.versions == [3, 3] + [4] * 10
    after = torch.tensor(score_tokens(engine, [pb], [row.tokens])[0])
    engine.update_weights(w3, version=3)
    before = torch.tensor(score_tokens(engine, [pb], [row.tokens])[0])
    behavior = torch.tensor(row.logprobs)
    # first tokens: the old weights' log-probs; the rest: the new weights'
    torch.testing.assert_close(behavior[:2], before[:2], rtol=0, atol=1e-5)
    torch.testing.assert_close(behavior[2:], after[2:], rtol=0, atol=1e-5)
    assert (before[2:] - after[2:]).abs().max() > 1e-2  # the two versions do differ
    # the same uniforms as an uninterrupted rollout: the first two tokens are what v3 sampled
    assert row.tokens[:2] == cut.tokens

    # TIS with the trainer at v4: 1 on the tokens v4 sampled, pi_4 / pi_3 on the older ones
    payload = batch_payload(done, info)
    assert payload[6] == [row.versions] and payload[5] == [3]
    mask = torch.ones(1, 12)
    w, _ = rollout_correction(after[None], behavior[None], mask, mode="tis", cap=1e6)
    torch.testing.assert_close(w[0, 2:], torch.ones(10), rtol=0, atol=1e-4)
    torch.testing.assert_close(w[0, :2], (after[:2] - before[:2]).exp(), rtol=1e-4, atol=0)


def test_group_older_than_the_bound_is_regenerated(setup):
    engine, (pa, _) = setup
    engine.update_weights(_new_weights(engine, 5), version=9)
    old = new_group(1, pa, SP.seed, 0, 2)
    for r in old.rows:
        r.tokens, r.logprobs, r.versions = [5, 6], [-1.0, -1.0], [6, 7]
    done, left, info = run_round(engine, [old], SP, batch_groups=1, oldest_allowed=7)
    assert info["rollout/partial_restarted"] == 1.0 and done[0].restarts == 1
    assert all(r.versions == [9] * 12 for r in done[0].rows)  # dropped and sampled anew
    fresh = run_round(engine, [new_group(1, pa, SP.seed, 0, 2)], SP, batch_groups=1,
                      oldest_allowed=7)[0]  # fmt: skip
    assert [r.tokens for r in done[0].rows] == [r.tokens for r in fresh[0].rows]


def test_length_tail_workload_caps_both_decoders(setup):
    engine, (pa, pb) = setup
    engine.length_tail = True
    engine.eos_token_ids = list(range(0, 512, 2))  # half the vocabulary ends a rollout...
    try:
        sp = SamplingParams(n=8, temperature=1.0, max_new_tokens=64, seed=3)
        comps = engine.generate([GenerateRequest(pa), GenerateRequest(pb)], sp)
        lengths = [len(c.token_ids) for grp in comps for c in grp]
        # ...but not before the rollout's drawn length
        assert lengths == [length_cap(3, i, j, 64) for i in range(2) for j in range(8)]
        assert all(t % 2 for grp in comps for c in grp for t in c.token_ids[:-1])
        # the partial decoder stops at the same lengths, with the same tokens
        done, _, _ = run_round(
            engine, [new_group(0, pa, 3, 0, 8)], sp, batch_groups=1, oldest_allowed=0
        )
        assert [r.tokens for r in done[0].rows] == [c.token_ids for c in comps[0]]
    finally:
        engine.length_tail, engine.eos_token_ids = False, []
