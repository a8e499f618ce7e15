"""Typed training configuration: dataclasses (`schema.py`), validation, dotted overrides
(`overrides.py`), json dump.

Every field carries its default and meaning in `metadata["help"]` (TRL style); `describe()` prints
them all. Recipes (`recipes/`) are Python functions returning a validated `TrainConfig`; the command
line changes single fields with dotted overrides: `rlrt train --recipe tiny_demo train.steps=5
algorithm.rlrt.alpha=0.5`. `validate()` runs before any work and names the dotted key and the fix.

The `algorithm` section is `rlrt_megatron.algorithms.AlgorithmConfig` (one sub-config per
algorithm: `algorithm.rlrt.alpha`, `algorithm.rlsd.teacher_refresh_every`, ...), so the algorithms
and the trainer share one name per setting. Importing this package needs torch (through
`rlrt_megatron.algorithms`), not megatron.
"""

from __future__ import annotations

import json
import os

from rlrt_megatron.config import overrides
from rlrt_megatron.config.overrides import ConfigError, all_keys, apply_overrides, field_help
from rlrt_megatron.config.schema import (
    ALGORITHM_NAMES,
    REDACTED,
    SECRET_KEYS,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    FP8Settings,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RolloutConfig,
    TeacherConfig,
    TimeoutsConfig,
    TrainConfig,
    TrainLoopConfig,
    validation_errors,
)

__all__ = [
    "ALGORITHM_NAMES",
    "REDACTED",
    "SECRET_KEYS",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "FP8Settings",
    "LoggingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "RolloutConfig",
    "TeacherConfig",
    "TimeoutsConfig",
    "TrainConfig",
    "TrainLoopConfig",
    "all_keys",
    "apply_overrides",
    "describe",
    "field_help",
    "load_hf_config",
    "validation_errors",
]


def describe(cls: type = TrainConfig) -> str:
    """Every dotted key of `cls` with its default and meaning (`rlrt train --help-config`)."""
    return overrides.describe(cls)


def load_hf_config(path: str) -> dict | None:
    """The model's config.json as a dict (no transformers import), or None if absent."""
    p = os.path.join(path, "config.json") if path else ""
    if p and os.path.isfile(p):
        with open(p) as f:
            return json.load(f)
    return None
