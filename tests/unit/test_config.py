"""Config: validation names the dotted key, overrides coerce types, json round trip, recipes."""

from __future__ import annotations

import json

import pytest

from recipes import get_recipe, list_recipes
from rlrt_megatron.config import ConfigError, TrainConfig, apply_overrides, describe

HF = {"num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2}


@pytest.mark.parametrize(
    "override, key",
    [
        ("optimizer.lr=-1e-6", "optimizer.lr"),
        ("rollout.group_size=1", "rollout.group_size"),
        ("train.mini_batch_prompts=3", "train.mini_batch_prompts"),
        ("algorithm.rlrt.alpha=1.5", "algorithm.rlrt"),
        ("rollout.temperature=0", "rollout.temperature"),
        ("timeouts.update=0", "timeouts.update"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        get_recipe("tiny_demo", [override])


def test_tp_must_divide_heads():
    cfg = get_recipe("tiny_demo", ["parallel.tp=3"])
    with pytest.raises(ConfigError, match=r"parallel\.tp: 3 does not divide .*num_attention_heads"):
        cfg.validate(hf_config=HF)
    cfg = get_recipe("tiny_demo", ["parallel.tp=4"])
    with pytest.raises(ConfigError, match="num_key_value_heads=2"):
        cfg.validate(hf_config=HF)
    get_recipe("tiny_demo", ["parallel.tp=2"]).validate(hf_config=HF, world_size=2)


def test_fp8_requires_te_spec():
    with pytest.raises(ConfigError, match=r"model\.fp8\.enabled: FP8 requires model\.spec=te"):
        get_recipe("tiny_demo", ["model.fp8.enabled=true"])
    with pytest.raises(ConfigError, match=r"model\.fp8\.amax_history_len"):
        get_recipe("tiny_demo", ["model.fp8.amax_history_len=0"])
    cfg = get_recipe("tiny_demo", ["model.spec=te", "model.fp8.enabled=true"])
    from rlrt_megatron.megatron.te import fp8_transformer_kwargs

    kw = fp8_transformer_kwargs(cfg.model.fp8.to_te(), cfg.model.spec)
    assert kw["fp8"] == "hybrid" and kw["fp8_recipe"] == "delayed"
    assert fp8_transformer_kwargs(get_recipe("tiny_demo").model.fp8.to_te(), "local") == {}
    assert TrainConfig.from_dict(cfg.to_dict()).model.fp8.enabled


def test_data_parallel_divisibility():
    cfg = get_recipe("tiny_demo", ["train.mini_batch_prompts=1", "rollout.group_size=3"])
    with pytest.raises(ConfigError, match="data parallel 2"):
        cfg.validate(world_size=2)


def test_overrides_coerce_and_reject_unknown_keys():
    cfg = TrainConfig()
    apply_overrides(
        cfg,
        ["algorithm.rlrt.alpha=0.5", "train.steps=7", "logging.jsonl=false", "eval.datasets=a,b"],
    )
    assert cfg.algorithm.rlrt.alpha == 0.5 and cfg.train.steps == 7
    assert cfg.logging.jsonl is False and cfg.eval.datasets == ["a", "b"]
    with pytest.raises(ConfigError, match=r"did you mean algorithm\.rlrt\.alpha"):
        apply_overrides(cfg, ["algorithm.rlrt.alhpa=0.5"])
    with pytest.raises(
        ConfigError, match=r"algorithm\.rlrt: RLRTConfig\.alpha must be in \[0, 1\]"
    ):
        get_recipe("tiny_demo", ["algorithm.rlrt.alpha=2"])
    with pytest.raises(ConfigError, match=r"train\.steps: cannot read 'x' as int"):
        apply_overrides(cfg, ["train.steps=x"])
    with pytest.raises(ConfigError, match="algorithm.name: must be one of"):
        get_recipe("tiny_demo", ["algorithm.name=ppo"])


def test_json_round_trip(tmp_path):
    cfg = get_recipe("qwen3_8b_rlrt")
    path = tmp_path / "config.json"
    cfg.to_json(str(path))
    again = TrainConfig.from_dict(json.loads(path.read_text()))
    assert again == cfg


def test_recipes_paper_settings_and_table():
    names = list_recipes()
    for model in ("qwen3_4b_base", "qwen3_8b", "llama3_8b"):
        for algo in ("rlrt", "grpo", "dapo", "rlsd", "srpo", "sdpo"):
            assert f"{model}_{algo}" in names
    cfg = get_recipe("qwen3_8b_rlrt")
    assert cfg.train.prompts_per_step == 256 and cfg.rollout.group_size == 8
    assert cfg.train.mini_batch_prompts == 128 and cfg.rollout.max_new_tokens == 20480
    assert cfg.optimizer.lr == 1e-6
    assert (cfg.algorithm.rlrt.eps_low, cfg.algorithm.rlrt.eps_high) == (0.2, 0.28)
    assert cfg.rollout.temperature == 1.0 and cfg.rollout.engine == "sglang"
    grpo = get_recipe("qwen3_8b_grpo")
    assert grpo.algorithm.name == "grpo" and grpo.parallel == cfg.parallel
    assert get_recipe("tiny_demo").model.build_tiny
    with pytest.raises(ConfigError, match="did you mean"):
        get_recipe("tiny_dem")


def test_every_field_documented():
    text = describe()
    assert "algorithm.rlrt.alpha = 1.0\n    interpolation, 0 = GRPO exactly" in text
    for block in text.split("\n")[1::2]:
        assert block.strip(), "a field without help text"


def test_max_staleness_and_its_async_steps_alias():
    assert get_recipe("tiny_demo").rollout.staleness == 0
    assert get_recipe("tiny_demo", ["rollout.async_steps=1"]).rollout.staleness == 1
    assert get_recipe("tiny_demo", ["rollout.max_staleness=2"]).rollout.staleness == 2
    ok = ["rollout.async_steps=1", "rollout.max_staleness=1"]
    assert get_recipe("tiny_demo", ok).rollout.staleness == 1
    with pytest.raises(ConfigError, match="rollout.async_steps.*alias"):
        get_recipe("tiny_demo", ["rollout.async_steps=1", "rollout.max_staleness=2"])
    with pytest.raises(ConfigError, match="rollout.max_staleness"):
        get_recipe("tiny_demo", ["rollout.max_staleness=-1"])
    with pytest.raises(ConfigError, match="rollout.partial.*max_staleness >= 1"):
        get_recipe("tiny_demo", ["rollout.partial=true"])
    assert get_recipe("tiny_demo", ["rollout.partial=true", "rollout.max_staleness=2"])
