"""Prompt rendering: the question plus an instruction, through the tokenizer's chat template.

The student sees one user message, `problem + separator + instruction`, rendered with
`tokenizer.apply_chat_template(..., add_generation_prompt=True)` (optionally after a system
message), so its token ids end exactly where the assistant's response begins. Tokenizers without a
chat template (base models) use `raw_template` instead when `use_chat_template=False`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class PromptTemplate:
    """How a problem becomes the student's prompt (all fields are config strings).

    Attributes:
        instruction: appended to every problem (empty: none); asks for `\\boxed{}` by default.
        separator: between the problem and the instruction.
        system_prompt: an optional system message before the user message.
        use_chat_template: render with the tokenizer's chat template (False: `raw_template`).
        raw_template: plain-text prompt with `{content}` when not using the chat template.
        chat_template_kwargs: extra keyword arguments to `apply_chat_template`
            (e.g. `{"enable_thinking": False}` for Qwen3).
    """

    instruction: str = DEFAULT_INSTRUCTION
    separator: str = "\n"
    system_prompt: str | None = None
    use_chat_template: bool = True
    raw_template: str = "{content}\n"
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt as the model sees it: the user message, the rendered text and its token ids."""

    content: str
    text: str
    token_ids: list[int]


def user_content(problem: str, template: PromptTemplate) -> str:
    """The user message: the problem, then the instruction (if any)."""
    return (
        f"{problem}{template.separator}{template.instruction}" if template.instruction else problem
    )


def render_text(tokenizer: Any, content: str, template: PromptTemplate) -> str:
    """`content` as one user turn ending with the assistant's generation prompt."""
    if not template.use_chat_template:
        text = template.raw_template.format(content=content)
        return f"{template.system_prompt}\n\n{text}" if template.system_prompt else text
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"render_prompt: tokenizer {type(tokenizer).__name__} "
            f"({getattr(tokenizer, 'name_or_path', '?')}) has no chat template; use a chat "
            "tokenizer or set the prompt template's use_chat_template=False (raw_template)"
        )
    messages = []
    if template.system_prompt:
        messages.append({"role": "system", "content": template.system_prompt})
    messages.append({"role": "user", "content": content})
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **template.chat_template_kwargs
    )


def tokenize_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered text; the chat template already wrote any BOS/special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_prompt(
    tokenizer: Any, problem: str, template: PromptTemplate | None = None
) -> RenderedPrompt:
    """Render one problem for the student (chat template + generation prompt)."""
    template = template or PromptTemplate()
    content = user_content(problem, template)
    text = render_text(tokenizer, content, template)
    return RenderedPrompt(content=content, text=text, token_ids=tokenize_text(tokenizer, text))


def render_prompts(
    tokenizer: Any, problems: Sequence[str], template: PromptTemplate | None = None
) -> list[RenderedPrompt]:
    return [render_prompt(tokenizer, p, template) for p in problems]


def filter_by_prompt_length(
    dataset: Any,
    tokenizer: Any,
    max_prompt_tokens: int,
    template: PromptTemplate | None = None,
    on_bad_row: str = "error",
) -> tuple[Any, int]:
    """Drop rows whose rendered prompt is longer than `max_prompt_tokens`, and rows whose prompt
    fails to render (e.g. a lone UTF-16 surrogate from a JSON `\\ud800` escape, which the
    tokenizer rejects): with `on_bad_row="error"` a `ValueError` names the data file, the prompt
    and the reason; with `"skip"` the row is dropped and counted in the returned dataset's
    `n_skipped` (reason in `skipped`), like the loader's bad rows.

    Every prompt is rendered here, once, before training: a bad row in the middle of the data is
    found before the first step, never dropped silently when its step comes.
    Returns `(dataset with the kept rows, number dropped for length)`; `dataset` is a
    `PromptDataset`.
    """
    from dataclasses import replace

    kept, n_bad, reasons = [], 0, list(getattr(dataset, "skipped", []))
    for i, r in enumerate(dataset.rows):
        try:
            n = len(render_prompt(tokenizer, r.problem, template).token_ids)
        except Exception as e:  # noqa: BLE001 - any tokenizer / template failure of one row
            why = (
                f"{getattr(dataset, 'path', '')}: prompt {i} ({r.problem[:40]!r}...) failed to "
                f"render: {type(e).__name__}: {e}"
            )
            if on_bad_row != "skip":
                raise ValueError(f"{why}; fix the row or set data.on_bad_row=skip") from e
            n_bad += 1
            reasons.append(why)
            continue
        if n <= max_prompt_tokens:
            kept.append(r)
    n_too_long = len(dataset.rows) - len(kept) - n_bad
    skipped = getattr(dataset, "n_skipped", 0) + n_bad
    return replace(dataset, rows=kept, n_skipped=skipped, skipped=reasons[:20]), n_too_long
