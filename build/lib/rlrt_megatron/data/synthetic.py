"""Synthetic arithmetic problems: the project's own data for the demo, tests and the tiny tokenizer.

Rows use the simple `{"problem", "answer", "solution"}` format of `data/`. Deterministic given a
seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

OPS = ("+", "-", "*")


def arithmetic_problem(rng: random.Random, max_operand: int = 20, n_terms: int = 2) -> dict:
    """One problem like `What is 7 + 12?` with its answer and a worked solution."""
    terms = [rng.randint(0, max_operand) for _ in range(n_terms)]
    ops = [rng.choice(OPS) for _ in range(n_terms - 1)]
    expr = str(terms[0])
    value = terms[0]
    steps = []
    for op, t in zip(ops, terms[1:], strict=True):
        new = value + t if op == "+" else value - t if op == "-" else value * t
        steps.append(f"{value} {op} {t} = {new}")
        expr = f"{expr} {op} {t}"
        value = new
    solution = ". ".join(steps) + f". The answer is \\boxed{{{value}}}."
    return {"problem": f"What is {expr}?", "answer": str(value), "solution": solution}


def arithmetic_dataset(
    n: int, seed: int = 0, max_operand: int = 20, n_terms: int = 2
) -> list[dict]:
    rng = random.Random(seed)
    return [arithmetic_problem(rng, max_operand, n_terms) for _ in range(n)]


def synthetic_corpus(n: int = 2000, seed: int = 0) -> Iterator[str]:
    """Text for training the tiny tokenizer and SFT-warming the tiny model."""
    rng = random.Random(seed)
    for _ in range(n):
        row = arithmetic_problem(
            rng, max_operand=rng.choice((9, 20, 99)), n_terms=rng.choice((2, 3))
        )
        yield f"{row['problem']}\n{row['solution']}"


def synthetic_prompt_dataset(n: int, seed: int = 0, max_operand: int = 20, n_terms: int = 2):
    """`arithmetic_dataset` as a `PromptDataset` (the `data.path=synthetic` source)."""
    from rlrt_megatron.data.datasets import rows_to_dataset

    return rows_to_dataset(arithmetic_dataset(n, seed, max_operand, n_terms), name="synthetic")


def write_synthetic_jsonl(path, n: int, seed: int = 0, max_operand: int = 20, n_terms: int = 2):
    """Write an arithmetic split as simple-format jsonl (`problem`, `answer`, `solution`)."""
    from rlrt_megatron.data.datasets import write_jsonl

    return write_jsonl(arithmetic_dataset(n, seed, max_operand, n_terms), path)
