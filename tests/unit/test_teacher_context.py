"""Prompt rendering and the teacher-context builder (peer: RLRT/SDPO/SRPO; reference: RLSD)."""

from __future__ import annotations

import random

import pytest

from rlrt_megatron.convert.tiny import build_tokenizer
from rlrt_megatron.data.teacher import (
    DEFAULT_TEACHER_TEMPLATE,
    build_teacher_contexts,
    strip_thinking,
    validate_teacher_template,
)
from rlrt_megatron.data.templates import PromptTemplate, render_prompt, user_content


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(vocab_size=512, seed=0, n_texts=400)


def test_render_prompt_uses_chat_template_and_ends_at_response(tok):
    tpl = PromptTemplate(instruction="Put the final answer in \\boxed{}.", separator=" ")
    rp = render_prompt(tok, "What is 2 + 3?", tpl)
    assert rp.content == "What is 2 + 3? Put the final answer in \\boxed{}."
    assert rp.text == (
        "<|im_start|>user\nWhat is 2 + 3? Put the final answer in \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.decode(rp.token_ids) == rp.text
    # prompt + response ids equal the tokenization of the whole conversation up to the response
    resp = tok("2 + 3 = 5. The answer is \\boxed{5}.", add_special_tokens=False)["input_ids"]
    full = tok(rp.text + "2 + 3 = 5. The answer is \\boxed{5}.", add_special_tokens=False)
    assert rp.token_ids + resp == full["input_ids"]
    sys_tpl = PromptTemplate(system_prompt="Be brief.", instruction="")
    assert render_prompt(tok, "Q", sys_tpl).text.startswith("<|im_start|>system\nBe brief.")
    raw = PromptTemplate(use_chat_template=False, raw_template="Question: {content}\nAnswer:")
    assert render_prompt(tok, "Q", raw).text.startswith("Question: Q\nPlease reason")


def test_render_prompt_without_chat_template_names_the_fix(tok):
    class NoTemplate:
        chat_template = None
        name_or_path = "base-model"

    with pytest.raises(ValueError, match="use_chat_template=False"):
        render_prompt(NoTemplate(), "Q")


def test_strip_thinking():
    assert strip_thinking("<think>scratch</think>\n\nThe answer is 5.") == "The answer is 5."
    assert strip_thinking("scratch (prompt opened the tag)</think>x=5") == "x=5"
    assert strip_thinking("<think>never closed") == "never closed"
    assert strip_thinking(" plain ") == "plain"


G = 4
COMPLETIONS = [
    # group 0: rollouts 0 and 2 correct
    "<think>hmm</think>The answer is \\boxed{5}.",
    "It is \\boxed{6}.",
    "Clearly \\boxed{5}.",
    "No idea.",
    # group 1: only rollout 5 correct
    "bad",
    "<think>a</think>So \\boxed{12}.",
    "bad",
    "bad",
    # group 2: none correct
    "x",
    "y",
    "z",
    "w",
]
REWARDS = [1, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0]
PROBLEMS = ["What is 2 + 3?", "What is 3 * 4?", "What is 9 - 1?"]


def test_peer_contexts_use_a_different_correct_rollout(tok):
    tpl = PromptTemplate()
    ctx = build_teacher_contexts(
        PROBLEMS, COMPLETIONS, REWARDS, G, mode="peer", tokenizer=tok, prompt_template=tpl, seed=0
    )
    assert len(ctx) == 12
    # group 0: each correct rollout sees the other; incorrect ones see one of the two
    assert ctx[0].peer_index == 2 and ctx[2].peer_index == 0
    assert ctx[1].peer_index in (0, 2) and ctx[3].peer_index in (0, 2)
    # group 1: the only correct rollout has no other correct peer -> no teacher
    assert ctx[5] is None
    assert all(ctx[i].peer_index == 5 for i in (4, 6, 7))
    assert all(c is None for c in ctx[8:])
    # the exact teacher prompt: DESIGN's reprompt template, thinking stripped, chat-rendered
    expected_msg = DEFAULT_TEACHER_TEMPLATE.format(
        prompt=user_content(PROBLEMS[0], tpl), peer_solution="The answer is \\boxed{5}."
    )
    assert ctx[2].text == f"<|im_start|>user\n{expected_msg}<|im_end|>\n<|im_start|>assistant\n"
    assert ctx[2].source == "peer"
    assert ctx[2].token_ids == tok(ctx[2].text, add_special_tokens=False)["input_ids"]
    assert ctx[4].text.count("So \\boxed{12}.") == 1 and "<think>" not in ctx[4].text
    # teacher prefix + response ids == tokenization of the teacher conversation with the response
    resp = tok("The answer is 5.", add_special_tokens=False)["input_ids"]
    whole = tok(ctx[1].text + "The answer is 5.", add_special_tokens=False)["input_ids"]
    assert ctx[1].token_ids + resp == whole


def test_peer_choice_is_seeded_and_varies():
    rewards = [1, 1, 1, 1, 0, 0]
    comps = ["a", "b", "c", "d", "e", "f"]

    class Tok:  # the choice does not depend on the tokenizer
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return messages[-1]["content"]

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [len(text)]}

    def peers(seed):
        ctx = build_teacher_contexts(["p"], comps, rewards, 6, tokenizer=Tok(), seed=seed)
        return [c.peer_index if c else None for c in ctx]

    assert peers(0) == peers(0)
    runs = {tuple(peers(s)) for s in range(20)}
    assert len(runs) > 1
    for run in runs:
        assert all(p != i and p is not None and p < 4 for i, p in enumerate(run))
    rng = random.Random(5)
    ctx = build_teacher_contexts(["p"], comps, rewards, 6, tokenizer=Tok(), rng=rng)
    assert len(ctx) == 6


def test_reference_contexts(tok):
    refs = ["ref sol 5", "ref sol 12", "ref sol 8"]
    ctx = build_teacher_contexts(
        [p for p in PROBLEMS for _ in range(G)],  # one prompt per rollout is accepted too
        COMPLETIONS,
        REWARDS,
        G,
        mode="reference",
        references=refs,
        tokenizer=tok,
    )
    assert all(c is not None and c.source == "reference" for c in ctx)
    assert all("ref sol 12" in ctx[i].text for i in range(4, 8))
    assert ctx[8].token_ids == ctx[11].token_ids
    longest = max(len(c.token_ids) for c in ctx)
    short = build_teacher_contexts(
        PROBLEMS,
        COMPLETIONS,
        REWARDS,
        G,
        "reference",
        ["r"] * 2 + ["x" * 500],
        tokenizer=tok,
        max_prefix_tokens=longest,
    )
    assert short[0] is not None and all(c is None for c in short[8:])


def test_template_validation_and_errors(tok):
    validate_teacher_template("{prompt} / {solution}")
    with pytest.raises(ValueError, match=r"data.teacher_template: unknown placeholder.*answer"):
        validate_teacher_template("{prompt} {answer}")
    with pytest.raises(ValueError, match="must contain"):
        validate_teacher_template("{peer_solution} only")
    with pytest.raises(ValueError, match="not a valid format string"):
        validate_teacher_template("{prompt} {peer_solution} {")
    with pytest.raises(ValueError, match="one reference text per group"):
        build_teacher_contexts(PROBLEMS, COMPLETIONS, REWARDS, G, "reference", tokenizer=tok)
    with pytest.raises(ValueError, match="multiple of group_size"):
        build_teacher_contexts(PROBLEMS, COMPLETIONS[:-1], REWARDS[:-1], G, tokenizer=tok)
    with pytest.raises(ValueError, match="one prompt per group"):
        build_teacher_contexts(PROBLEMS[:2], COMPLETIONS, REWARDS, G, tokenizer=tok)
