"""Recipes: Python functions returning a validated `TrainConfig`.

`get_recipe(name)` builds one, `list_recipes()` names them all. The paper-scale recipes are
generated from two tables (models x algorithms), so `qwen3_8b_grpo` differs from
`qwen3_8b_rlrt` only in the algorithm row. Change single values with dotted overrides
(`rlrt train --recipe qwen3_8b_rlrt train.steps=10`).
"""

from __future__ import annotations

from recipes.registry import get_recipe, list_recipes, register_recipe

__all__ = ["get_recipe", "list_recipes", "register_recipe"]
