"""`rlrt plan` and the planner check of `rlrt slurm submit` (pure arithmetic: no torch work)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlrt_megatron.launch.plan import (
    Layout,
    ModelShape,
    PlanError,
    Settings,
    gpu_limit,
    model_shape,
    predict,
    static_bytes,
)
from rlrt_megatron.launch.plan_shapes import BUILTIN_SHAPES

REPO = Path(__file__).resolve().parents[2]


def rlrt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlrt_megatron.cli", *args],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip


def test_8b_fits_on_4_nodes_not_on_one_gpu():
    p = rlrt("plan", "--recipe", "qwen3_8b_rlrt", "--nodes", "4", "--gpus-per-node", "8",
             "--gpu", "h100-80gb")  # fmt: skip
    assert p.returncode == 0, p.stderr
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("fits=yes peak_gib=") and last.endswith("limit_gib=79.6")
    assert "Qwen3-8B (built-in shape: " in p.stdout  # the recipe's HF dir is not here
    for row in ("weights", "gradients", "optimizer (distributed, 1/8)", "activations (24576",
                "LM head", "SGLang weights + KV cache"):  # fmt: skip
        assert row in p.stdout
    p = rlrt("plan", "--recipe", "qwen3_8b_rlrt", "--nodes", "1", "--gpus-per-node", "1",
             "--gpu", "h100-80gb")  # fmt: skip
    assert p.returncode == 3, p.stderr
    assert p.stdout.strip().splitlines()[-1].startswith("fits=no ")
    assert "suggestion: --nodes" in p.stdout


def test_bad_recipe_or_gpu_exit_2_with_one_line():
    for args in (["--recipe", "qwen3_8b_rlrtt", "--gpu", "h100-80gb"],
                 ["--recipe", "qwen3_8b_rlrt", "--gpu", "v100"],
                 ["--recipe", "qwen3_8b_rlrt", "--gpu", "h100-80gb", "parallel.tp=x"]):  # fmt: skip
        p = rlrt("plan", *args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("rlrt plan: ")


def test_config_error_spanning_lines_is_printed_whole():
    # a validation error is "invalid config:" then one line per key (issue 24 item 5)
    p = rlrt("plan", "--recipe", "qwen3_8b_rlrt", "parallel.tp=0", "optimizer.lr=0")
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert lines[0] == "rlrt plan: invalid config:"
    assert any(ln.strip().startswith("parallel.tp: must be >= 1 (got 0)") for ln in lines)
    assert any(ln.strip().startswith("optimizer.lr: must be > 0") for ln in lines)


@pytest.mark.parametrize("mem", ["nan", "inf", "-inf", "0", "-3"])
def test_non_finite_or_non_positive_gpu_memory_refused(mem):
    with pytest.raises(PlanError, match="finite number of GiB > 0"):
        gpu_limit(None, float(mem))
    p = rlrt("plan", "--recipe", "qwen3_8b_rlrt", f"--gpu-mem-gib={mem}")
    assert p.returncode == 2 and "--gpu-mem-gib" in p.stderr and p.stdout == "", p.stderr


def test_ema_teacher_counted_in_fp32():
    from recipes import get_recipe
    from rlrt_megatron.launch.plan import GIB, plan_config

    def teacher_gib(recipe: str) -> float:
        plan = plan_config(get_recipe(recipe), nodes=4, gpus_per_node=8, limit_gib=139.8)
        return sum(v for k, v in plan.rows.items() if k.startswith("teacher copy"))

    s8 = BUILTIN_SHAPES["qwen3-8b"]
    params = static_bytes(s8, tp=4, pp=1, dp=8, stage=0, distributed=True, param_bytes=2).params
    assert teacher_gib("qwen3_8b_sdpo") == pytest.approx(params * 4 / GIB)  # fp32 EMA
    assert teacher_gib("qwen3_8b_sdpo") == pytest.approx(7.63, abs=0.01)
    assert teacher_gib("qwen3_8b_rlsd") == pytest.approx(params * 2 / GIB)  # bf16 snapshot
    assert teacher_gib("qwen3_8b_rlrt") == 0


def test_shape_from_config_json_and_builtin_table(tmp_path):
    cfg = {"model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
           "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
           "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape, src = model_shape(str(tmp_path))
    assert src.endswith("config.json")
    assert dataclass_eq(shape, BUILTIN_SHAPES["qwen3-0.6b"])
    shape, src = model_shape("/nowhere/Llama-3.1-8B-Instruct")
    assert shape.vocab == 128256 and "not found here" in src
    with pytest.raises(PlanError, match="no config.json"):
        model_shape("/nowhere/my-model")
    with pytest.raises(PlanError, match="unknown GPU kind"):
        gpu_limit("tpu", None)


def dataclass_eq(a: ModelShape, b: ModelShape) -> bool:
    from dataclasses import astuple

    return astuple(a)[1:] == astuple(b)[1:]


def test_known_parameter_counts_and_sharding():
    # Qwen3-8B: 8.19B parameters (embedding and LM head untied)
    s8 = BUILTIN_SHAPES["qwen3-8b"]
    st = static_bytes(s8, tp=1, pp=1, dp=1, stage=0, distributed=False, param_bytes=2)
    assert abs(st.params - 8.19e9) < 0.01e9
    # TP splits everything but the norms; the distributed optimizer splits its state over DP
    st4 = static_bytes(s8, tp=4, pp=1, dp=8, stage=0, distributed=True, param_bytes=2)
    assert st.params / 4 < st4.params < st.params / 4 * 1.001
    assert abs(st4.optimizer - 12 * st4.params / 8) / st4.optimizer < 1e-3


def test_more_tokens_more_memory_and_suggestions():
    shape = BUILTIN_SHAPES["qwen3-4b-base"]
    lay = Layout(nodes=1, gpus_per_node=8, tp=2, pp=1)
    small = predict(shape, lay, Settings(tokens_per_microbatch=8192), 79.6)
    big = predict(shape, lay, Settings(tokens_per_microbatch=65536), 79.6)
    assert big.peak_gib > small.peak_gib and small.fits and not big.fits
    from rlrt_megatron.launch.plan import suggest

    text = suggest(big)
    assert text and ("parallel.tp=" in text or "max_tokens_per_microbatch" in text)
    # only layouts the trainer accepts at their world size are suggested (plan_config passes
    # the trainer's check as `valid`)
    assert suggest(big, valid=lambda lay: False) == ""
    only_tp4 = suggest(big, valid=lambda lay: lay.tp == 4)
    assert only_tp4.startswith("parallel.tp=4") and only_tp4 != text


def test_slurm_submit_refuses_a_layout_that_does_not_fit():
    from rlrt_megatron.launch.job import SlurmJob, SlurmJobError
    from rlrt_megatron.launch.submit import check_memory

    job = SlurmJob("qwen3_8b_rlrt", nodes=1, gpus_per_node=8, home="/shared/rlrt")
    cfg = job.validate()
    with pytest.raises(SlurmJobError, match=r"(?s)does not fit.*--force.*fits=no"):
        check_memory(job, cfg, gpu="h100-80gb", gpu_mem_gib=None, force=False)
    logged: list[str] = []
    check_memory(job, cfg, gpu="h100-80gb", gpu_mem_gib=None, force=True, log=logged.append)
    assert "--force" in logged[0]
    n = len(logged)
    check_memory(job, cfg, gpu="h200-141gb", gpu_mem_gib=None, force=False, log=logged.append)
    assert logged[n].startswith("memory: fits=yes")
    assert logged[-1].startswith("step time (rough): ~")  # then the plan's notes


def test_dry_run_mkdir_validates_as_if_created(tmp_path):
    missing = tmp_path / "ckpt"
    p = rlrt("slurm", "submit", "--recipe", "tiny_demo", "--gpus-per-node", "0", "--dry-run",
             "--mkdir", f"checkpoint.dir={missing}")  # fmt: skip
    assert "would create checkpoint.dir=" in p.stderr
    assert "does not exist" not in p.stderr and "Traceback" not in p.stderr
    assert not missing.exists()
    assert p.returncode == 0, p.stderr  # with or without nemo-run: a dry run only writes text
    assert "#SBATCH --ntasks-per-node=1" in p.stdout and "set -- --recipe tiny_demo" in p.stdout


def test_plan_notes_rollouts_peak_margin_and_step_time():
    from recipes import get_recipe
    from rlrt_megatron.launch.plan import plan_config
    from rlrt_megatron.launch.plan_notes import MARGIN_GIB, notes

    cfg = get_recipe("qwen3_8b_rlrt")
    plan = plan_config(cfg, nodes=4, gpus_per_node=8, limit_gib=79.6)
    lines = notes(cfg, plan, "h100-80gb")
    assert lines[0] == ("rollouts: 16 SGLang server(s) of tp 2 colocated on the training GPUs "
                        "(KV cache released after sampling); weight sync tensor")  # fmt: skip
    assert lines[1].startswith("SGLang weights + KV cache (sampling) is not in the peak")
    assert lines[-1].startswith("step time (rough): ~") and "500 steps" in lines[-1]
    assert not any(ln.startswith("warning:") for ln in lines)  # 6 GiB of margin
    tight = plan_config(cfg, nodes=4, gpus_per_node=8, limit_gib=plan.peak_gib + 1)
    assert tight.fits and tight.limit_gib - tight.peak_gib < MARGIN_GIB
    assert any(ln.startswith("warning: the peak is within") for ln in notes(cfg, tight, None))
    sep = plan_config(cfg, nodes=5, gpus_per_node=8, limit_gib=79.6, rollout_nodes=1)
    assert notes(cfg, sep, None)[0] == (
        "rollouts: 4 SGLang server(s) of tp 2 on 1 rollout node(s); weight sync distributed"
    )
    # the same FLOPs over 2x the GPUs: the training part halves
    big = plan_config(cfg, nodes=8, gpus_per_node=8, limit_gib=79.6)
    t4 = float(lines[-1].split("training ")[1].split(" ")[0])
    t8 = float(notes(cfg, big, "h100-80gb")[-1].split("training ")[1].split(" ")[0])
    assert t8 == pytest.approx(t4 / 2, abs=0.06)
