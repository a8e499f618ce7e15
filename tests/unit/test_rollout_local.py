"""LocalEngine: sampling, behavior log-probs, seeds, stops, padded vocab, weight updates."""

from __future__ import annotations

import pytest
import torch

from rlrt_megatron.convert.tiny import build_tokenizer, randomize_weights, tiny_config
from rlrt_megatron.data.templates import render_prompt
from rlrt_megatron.rollout.base import GenerateRequest, RolloutEngine, SamplingParams
from rlrt_megatron.rollout.local import LocalEngine, sample_next

PROBLEMS = ["What is 2 + 3?", "What is 12 * 7 - 4?", "What is 9?"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(vocab_size=512, seed=0, n_texts=400)


def make_model(tok, seed: int, tied: bool = True, std: float = 0.2):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("qwen3", vocab_size=512, tied=tied, tokenizer=tok)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    randomize_weights(model, seed, std=std)  # std 0.2: peaked enough that greedy is well defined
    return model.eval()


@pytest.fixture(scope="module")
def requests(tok):
    return [
        GenerateRequest(render_prompt(tok, p).token_ids, f"r{i}") for i, p in enumerate(PROBLEMS)
    ]


def teacher_forced_logprobs(model, prompt, response, vocab, temperature=1.0):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logits[:, vocab:] = float("-inf")
    logp = torch.log_softmax(logits / temperature, dim=-1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return logp[pos, torch.tensor(response)]


def test_protocol_and_shapes(tok, requests):
    eng = LocalEngine(make_model(tok, 0), tok, seed=0)
    assert isinstance(eng, RolloutEngine)
    assert eng.vocab_size == len(tok) < 512  # the model's embedding is padded past the tokenizer
    out = eng.generate(requests, SamplingParams(n=2, max_new_tokens=12, seed=3))
    assert [len(g) for g in out] == [2, 2, 2]
    for req, group in zip(requests, out, strict=True):
        for c in group:
            assert c.request_id == req.request_id and c.prompt_token_ids == req.prompt_token_ids
            assert len(c.token_ids) == len(c.logprobs) <= 12 and c.weight_version == 0
            assert c.finish_reason in ("stop", "length")
            assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
            assert all(lp <= 0 for lp in c.logprobs)
    assert eng.health()
    eng.shutdown()
    assert not eng.health()
    with pytest.raises(RuntimeError, match="after shutdown"):
        eng.generate(requests, SamplingParams())


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, -1), (0.7, 0.9, 50)])
def test_behavior_logprobs_match_teacher_forced(tok, requests, temperature, top_p, top_k):
    model = make_model(tok, 1)
    eng = LocalEngine(model, tok, seed=0)
    sp = SamplingParams(n=2, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=16)
    out = eng.generate(requests, sp)
    worst = 0.0
    for req, group in zip(requests, out, strict=True):
        for c in group:
            ref = teacher_forced_logprobs(
                model, req.prompt_token_ids, c.token_ids, eng.vocab_size, temperature
            )
            worst = max(worst, (torch.tensor(c.logprobs) - ref).abs().max().item())
    assert worst < 1e-5, worst


def test_greedy_matches_transformers_generate(tok, requests):
    model = make_model(tok, 2)
    eng = LocalEngine(model, tok, vocab_size=512)  # HF generate does not mask padded ids
    out = eng.generate(requests, SamplingParams(temperature=0.0, max_new_tokens=10))
    for req, group in zip(requests, out, strict=True):
        ids = torch.tensor([req.prompt_token_ids])
        ref = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=10,
            eos_token_id=eng.eos_token_ids,
            pad_token_id=eng.pad_token_id,
        )[0, ids.shape[1] :].tolist()
        assert group[0].token_ids == ref


def test_seeded_reproducible_and_batch_invariant(tok, requests):
    model = make_model(tok, 3)
    sp = SamplingParams(n=3, max_new_tokens=10, seed=11)
    a = LocalEngine(model, tok).generate(requests, sp)
    b = LocalEngine(model, tok, max_batch_rows=4).generate(requests, sp)  # chunked rows
    assert [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]
    alone = LocalEngine(model, tok).generate(requests[:1], sp)
    assert [c.token_ids for c in alone[0]] == [c.token_ids for c in a[0]]
    other = LocalEngine(model, tok).generate(requests, SamplingParams(n=3, max_new_tokens=10))
    assert [c.token_ids for c in other[0]] != [c.token_ids for c in a[0]]
    assert len({tuple(c.token_ids) for c in a[0]}) == 3  # the n samples differ
    # without SamplingParams.seed: the engine seed + call counter, restorable
    e1 = LocalEngine(model, tok, seed=5)
    e1.generate(requests, SamplingParams(max_new_tokens=4))
    state = e1.state_dict()
    nxt = e1.generate(requests, SamplingParams(max_new_tokens=8))
    e2 = LocalEngine(model, tok, seed=5)
    e2.load_state_dict(state)
    assert [g[0].token_ids for g in e2.generate(requests, SamplingParams(max_new_tokens=8))] == [
        g[0].token_ids for g in nxt
    ]


def test_never_samples_padded_vocab_ids(tok, requests):
    model = make_model(tok, 4, tied=False, std=0.02)
    bias = torch.zeros(512)
    bias[len(tok) :] = 30.0  # the padded rows become the most likely ids by far
    model.lm_head.bias = torch.nn.Parameter(bias)
    unmasked = LocalEngine(model, tok, vocab_size=512)
    out = unmasked.generate(requests, SamplingParams(n=2, max_new_tokens=5, seed=0))
    assert min(t for g in out for c in g for t in c.token_ids) >= len(tok)  # the setup bites
    eng = LocalEngine(model, tok)
    out = eng.generate(requests, SamplingParams(n=4, max_new_tokens=20, seed=0))
    assert max(t for g in out for c in g for t in c.token_ids) < len(tok)
    ref = teacher_forced_logprobs(
        model, requests[0].prompt_token_ids, out[0][0].token_ids, len(tok)
    )
    assert torch.allclose(torch.tensor(out[0][0].logprobs), ref, atol=1e-5)
    small = LocalEngine(model, tok, vocab_size=40)
    out = small.generate(requests[:1], SamplingParams(n=4, max_new_tokens=20, seed=0))
    assert max(t for c in out[0] for t in c.token_ids) < 40
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        small.generate([GenerateRequest([1, 600])], SamplingParams())


def test_eos_and_stop_strings(tok, requests):
    model = make_model(tok, 5)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=24)
    full = LocalEngine(model, tok).generate(requests[:1], greedy)[0][0]
    assert full.finish_reason == "length" and len(full.token_ids) == 24
    stop_id = full.token_ids[5]
    first = full.token_ids.index(stop_id)
    c = LocalEngine(model, tok, stop_token_ids=[stop_id]).generate(requests[:1], greedy)[0][0]
    assert c.finish_reason == "stop" and c.token_ids == full.token_ids[: first + 1]
    # a stop string: generation ends once it appears; the text is cut before it
    text = full.text
    k = next(
        i for i in range(3, len(text) - 1) if text[i : i + 2].isascii() and text[i : i + 2].strip()
    )
    stop = text[k : k + 2]
    s = LocalEngine(model, tok).generate(
        requests[:1], SamplingParams(temperature=0.0, max_new_tokens=24, stop=(stop,))
    )[0][0]
    assert s.finish_reason == "stop" and s.text == text[: text.find(stop)]
    assert s.token_ids == full.token_ids[: len(s.token_ids)] and len(s.token_ids) < 24


def test_update_weights_then_generation_equals_other_model(tok, requests):
    model_a, model_b = make_model(tok, 6), make_model(tok, 7)
    eng = LocalEngine(model_a, tok)
    ref = LocalEngine(model_b, tok)
    sp = SamplingParams(n=2, max_new_tokens=12, seed=9)
    before = eng.generate(requests, sp)
    eng.update_weights(((n, p.detach().clone()) for n, p in model_b.named_parameters()), 3)
    assert eng.weight_version == 3
    got, want = eng.generate(requests, sp), ref.generate(requests, sp)
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in want]
    assert [[c.token_ids for c in g] for g in got] != [[c.token_ids for c in g] for g in before]
    assert all(c.weight_version == 3 for g in got for c in g)
    for x, y in zip(got[0][0].logprobs, want[0][0].logprobs, strict=True):
        assert x == pytest.approx(y, abs=1e-6)
    # the tied head may be sent under its own name
    named = dict(model_a.named_parameters())
    named["lm_head.weight"] = named.pop("model.embed_tokens.weight")
    eng.update_weights(named.items(), 4)
    assert torch.equal(model_a.lm_head.weight, model_a.model.embed_tokens.weight)


def test_update_weights_errors_leave_weights_untouched(tok):
    model = make_model(tok, 8)
    eng = LocalEngine(model, tok)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    good = [(n, torch.zeros_like(p)) for n, p in model.named_parameters()]
    with pytest.raises(
        ValueError, match=r"unknown parameter name.*did you mean 'model.norm.weight'"
    ):
        eng.update_weights(good + [("model.norm.weights", torch.zeros(64))], 1)
    bad_shape = [(n, t if n != "model.norm.weight" else torch.zeros(65)) for n, t in good]
    with pytest.raises(ValueError, match=r"model.norm.weight: expected \(64,\), got \(65,\)"):
        eng.update_weights(bad_shape, 1)
    with pytest.raises(ValueError, match="not sent"):
        eng.update_weights(good[:3], 1)
    assert all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())
    assert eng.weight_version == 0
    eng.update_weights(good[:1], 2, strict=False)
    assert eng.weight_version == 2 and not torch.equal(
        dict(model.named_parameters())[good[0][0]], snapshot[good[0][0]]
    )


def test_load_from_directory(tmp_path, requests):
    from rlrt_megatron.convert.tiny import make_tiny_model

    path = make_tiny_model(tmp_path / "tiny", seed=0)
    eng = LocalEngine(path, seed=0)
    out = eng.generate(requests[:1], SamplingParams(n=2, max_new_tokens=6, seed=0))
    assert len(out[0]) == 2 and len(out[0][0].token_ids) <= 6
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LocalEngine(tmp_path)
    with pytest.raises(ValueError, match="top_p"):
        eng.generate(requests[:1], SamplingParams(top_p=0.0))


@pytest.mark.parametrize(
    "top_k, top_p, expected",
    [
        (-1, 1.0, [0.5, 0.3, 0.2, 0.0]),
        (2, 1.0, [0.625, 0.375, 0.0, 0.0]),
        (-1, 0.7, [0.625, 0.375, 0.0, 0.0]),  # nucleus: 0.5 < 0.7, 0.5 + 0.3 >= 0.7
        (-1, 0.4, [1.0, 0.0, 0.0, 0.0]),
    ],
)
def test_sampling_frequencies(top_k, top_p, expected):
    n = 4000
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.9])  # id 4 is padding: masked by vocab_size
    logits = probs.clamp_min(1e-30).log().expand(n, -1).clone()
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    nxt, lp = sample_next(logits, gens, 1.0, top_k, top_p, vocab_size=4)
    freq = torch.bincount(nxt, minlength=5).double() / n
    assert freq[3] == 0 and freq[4] == 0
    assert torch.allclose(freq[:4], torch.tensor(expected, dtype=torch.float64), atol=0.03)
    # behavior log-probs: of the full (untruncated) temperature-1 distribution over the true vocab
    assert torch.allclose(lp, probs[:4].log()[nxt], atol=1e-6)
