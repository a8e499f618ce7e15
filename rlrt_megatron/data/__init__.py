"""Prompt data: datasets and sampler, prompt templates, teacher contexts, synthetic tasks."""

from rlrt_megatron.data.datasets import (
    DatasetError,
    PromptDataset,
    PromptRow,
    PromptSampler,
    load_prompt_dataset,
    rows_to_dataset,
    write_jsonl,
)
from rlrt_megatron.data.teacher import (
    DEFAULT_TEACHER_TEMPLATE,
    TeacherContext,
    build_teacher_contexts,
    render_teacher_prompt,
    strip_thinking,
    validate_teacher_template,
)
from rlrt_megatron.data.templates import (
    DEFAULT_INSTRUCTION,
    PromptTemplate,
    RenderedPrompt,
    render_prompt,
    render_prompts,
)

__all__ = [
    "DEFAULT_INSTRUCTION",
    "DEFAULT_TEACHER_TEMPLATE",
    "DatasetError",
    "PromptDataset",
    "PromptRow",
    "PromptSampler",
    "PromptTemplate",
    "RenderedPrompt",
    "TeacherContext",
    "build_teacher_contexts",
    "load_prompt_dataset",
    "render_prompt",
    "render_prompts",
    "render_teacher_prompt",
    "rows_to_dataset",
    "strip_thinking",
    "validate_teacher_template",
    "write_jsonl",
]
