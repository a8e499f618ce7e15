"""Teacher contexts: what the teacher sees before the student's response (DESIGN.md, Algorithms).

- `mode="peer"` (RLRT, SDPO, SRPO): each rollout gets a *different* correct rollout of its own group
  as a worked solution (its `<think>...</think>` stripped), put into the SDPO reprompt template
  `"{prompt}\\nCorrect solution:\\n\\n{peer_solution}\\n\\nCorrectly solve the original
  question.\\n"`; a rollout whose group has no other correct rollout gets None (no teacher: token
  weight 1 for RLRT, no distillation term for SDPO/SRPO).
- `mode="reference"` (RLSD): every rollout gets its problem's reference solution/answer.

The filled template is one user message rendered with the tokenizer's chat template and the
generation prompt (the student's `PromptTemplate`: same system prompt, same kwargs), so
`TeacherContext.token_ids` ends exactly where the response begins: the log-prob code appends the
SAME response token ids to it as to the student prompt.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rlrt_megatron.data.templates import PromptTemplate, render_text, tokenize_text, user_content

DEFAULT_TEACHER_TEMPLATE = (
    "{prompt}\nCorrect solution:\n\n{peer_solution}\n\nCorrectly solve the original question.\n"
)
_FIELDS = {"prompt", "peer_solution", "solution"}


@dataclass(frozen=True)
class TeacherContext:
    """The teacher's prefix for one rollout.

    `token_ids`: the rendered teacher prompt (chat template + generation prompt), to which the
    rollout's response token ids are appended; `text`: the same as text; `source`: "peer" or
    "reference"; `peer_index`: flat index (group-major) of the rollout whose solution is shown.
    """

    token_ids: list[int]
    text: str
    source: str
    peer_index: int | None = None


def strip_thinking(text: str) -> str:
    """The answer part of a response: everything after the last `</think>`.

    Qwen3-style templates open `<think>` in the prompt, so a closing tag alone also counts. Without
    any `</think>` the text is kept (minus a dangling opening `<think>` tag).
    """
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1].strip()
    return (
        text.replace("<think>", "", 1).strip()
        if text.lstrip().startswith("<think>")
        else text.strip()
    )


def validate_teacher_template(template: str, key: str = "data.teacher_template") -> None:
    """Raise ValueError naming `key` if the template lacks a field or uses an unknown one."""
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(
            f"{key}: not a valid format string ({e}); escape literal braces as {{{{ }}}}"
        ) from e
    unknown = names - _FIELDS
    if unknown:
        raise ValueError(
            f"{key}: unknown placeholder(s) {sorted(unknown)}; use {{prompt}} and "
            "{peer_solution} (the peer's or reference solution; {solution} is an alias)"
        )
    if "prompt" not in names or not names & {"peer_solution", "solution"}:
        raise ValueError(
            f"{key}: the template must contain {{prompt}} and {{peer_solution}}; got {template!r}"
        )


def _fill(template: str, prompt: str, solution: str) -> str:
    return template.format(prompt=prompt, peer_solution=solution, solution=solution)


def render_teacher_prompt(
    tokenizer: Any,
    problem: str,
    solution: str,
    template: str = DEFAULT_TEACHER_TEMPLATE,
    prompt_template: PromptTemplate | None = None,
) -> tuple[str, list[int]]:
    """(text, token ids) of the teacher prompt for `problem` showing `solution`: the filled
    template as one user turn with the student's chat template and generation prompt."""
    ptemplate = prompt_template or PromptTemplate()
    content = _fill(template, user_content(problem, ptemplate), solution)
    text = render_text(tokenizer, content, ptemplate)
    return text, tokenize_text(tokenizer, text)


def build_teacher_contexts(
    prompts: Sequence[str],
    completions: Sequence[str],
    rewards: Sequence[float],
    group_size: int,
    mode: Literal["peer", "reference"] = "peer",
    references: Sequence[str] | None = None,
    *,
    tokenizer: Any,
    template: str = DEFAULT_TEACHER_TEMPLATE,
    prompt_template: PromptTemplate | None = None,
    strip_thinking_tags: bool = True,
    success_threshold: float = 1.0,
    seed: int = 0,
    rng: random.Random | None = None,
    max_prefix_tokens: int | None = None,
) -> list[TeacherContext | None]:
    """One teacher context (or None) per rollout.

    Args:
        prompts: the bare problems, one per group (the strings given to `render_prompt`), or one
            per rollout (then equal within each group).
        completions: response texts, group-major: rollout `g * group_size + j` is the j-th of
            group g.
        rewards: one per rollout; a rollout is correct when `reward >= success_threshold`.
        group_size: rollouts per prompt (G).
        mode: "peer" (RLRT/SDPO/SRPO) or "reference" (RLSD, needs `references`).
        references: one reference solution/answer text per group (`PromptRow.reference_text()`).
        tokenizer: the policy's tokenizer (its chat template renders the teacher prompt).
        template: the teacher template with `{prompt}` (the student's user message, instruction
            included) and `{peer_solution}`.
        prompt_template: the student's `PromptTemplate` (instruction, system prompt, kwargs).
        strip_thinking_tags: show the peer's answer part only (text after `</think>`).
        seed / rng: the choice among several correct peers (pass `rng` or a per-step `seed`).
        max_prefix_tokens: a teacher prefix longer than this gives None (no teacher for that
            rollout) instead of an over-long sequence.
    """
    validate_teacher_template(template, key="teacher template")
    n = len(completions)
    if group_size < 1 or n % group_size:
        raise ValueError(
            f"build_teacher_contexts: {n} completions is not a multiple of group_size={group_size}"
        )
    if len(rewards) != n:
        raise ValueError(f"build_teacher_contexts: {len(rewards)} rewards for {n} completions")
    n_groups = n // group_size
    if len(prompts) == n:
        prompts = [prompts[g * group_size] for g in range(n_groups)]
    if len(prompts) != n_groups:
        raise ValueError(
            f"build_teacher_contexts: {len(prompts)} prompts for {n_groups} groups of "
            f"{group_size}; pass one prompt per group (or one per rollout)"
        )
    if mode not in ("peer", "reference"):
        raise ValueError(f"build_teacher_contexts: mode={mode!r}; choose 'peer' or 'reference'")
    if mode == "reference" and (references is None or len(references) != n_groups):
        raise ValueError(
            "build_teacher_contexts: mode='reference' (RLSD) needs one reference text per group "
            f"({n_groups}); got {None if references is None else len(references)}"
        )
    ptemplate = prompt_template or PromptTemplate()
    rng = rng or random.Random(seed)
    cache: dict[tuple[int, int], TeacherContext] = {}  # (group, shown rollout | -1) -> ctx

    def make(g: int, solution: str, source: str, peer: int | None) -> TeacherContext | None:
        key = (g, -1 if peer is None else peer)
        if key not in cache:
            text, ids = render_teacher_prompt(tokenizer, prompts[g], solution, template, ptemplate)
            cache[key] = TeacherContext(ids, text, source, peer)
        ctx = cache[key]
        if max_prefix_tokens is not None and len(ctx.token_ids) > max_prefix_tokens:
            return None
        return ctx

    out: list[TeacherContext | None] = []
    for g in range(n_groups):
        lo = g * group_size
        if mode == "reference":
            assert references is not None
            out.extend(make(g, references[g], "reference", None) for _ in range(group_size))
            continue
        correct = [lo + j for j in range(group_size) if rewards[lo + j] >= success_threshold]
        for j in range(group_size):
            i = lo + j
            peers = [p for p in correct if p != i]
            if not peers:
                out.append(None)
                continue
            p = peers[rng.randrange(len(peers))]
            sol = strip_thinking(completions[p]) if strip_thinking_tags else completions[p]
            out.append(make(g, sol, "peer", p))
    return out
