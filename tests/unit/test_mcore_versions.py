"""megatron-core 0.16 (Python 3.11) and 0.19 (Python 3.12) from one code base (megatron/compat.py).

- checkpoints written under one version load under the other, bit for bit (both interpreters
  needed: `RLRT_MCORE016_PYTHON`, default `.venv/bin/python`, and `RLRT_MCORE019_PYTHON`,
  default `/opt/venv-mcore019/bin/python`, the venv `make test-mcore019` builds; skipped with
  the reason when one is missing);
- a load that fails names the version that wrote the checkpoint and the conversion to run;
- fully reshardable optimizer checkpoints resume at another data-parallel size;
- llama3 RoPE scaling with factors megatron does not fix matches transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed

from rlrt_megatron.megatron import compat

REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "tests" / "mcore_ckpt_probe.py"
INTERPRETERS = {
    "0.16": os.environ.get("RLRT_MCORE016_PYTHON", str(REPO / ".venv" / "bin" / "python")),
    "0.19": os.environ.get("RLRT_MCORE019_PYTHON", "/opt/venv-mcore019/bin/python"),
}


def _mcore_of(python: str) -> str | None:
    """The megatron-core minor version (`"0.19"`) installed for `python`, or None."""
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        return ".".join(compat.MCORE_VERSION.split(".")[:2])
    if not os.access(python, os.X_OK):
        return None
    code = "import importlib.metadata as m; print(m.version('megatron-core'))"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    return ".".join(out.stdout.strip().split(".")[:2]) if out.returncode == 0 else None


def _env() -> dict[str, str]:
    # this checkout's code in both interpreters (ahead of any editable install of another one)
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}


def _probe(python: str, mode: str, root: Path) -> subprocess.Popen:
    log = open(root / f"{mode}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [python, str(PROBE), mode, str(root)], stdout=log, stderr=subprocess.STDOUT, env=_env()
    )


def _result(proc: subprocess.Popen, root: Path, mode: str) -> dict:
    assert proc.wait(timeout=600) == 0, (root / f"{mode}.log").read_text()[-4000:]
    lines = [ln for ln in (root / f"{mode}.log").read_text().splitlines() if ln.startswith("PROBE")]
    return json.loads(lines[-1].removeprefix("PROBE "))


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """Both interpreters, each with its megatron-core, or a skip naming what is missing."""
    missing = [f"megatron-core {v} ({py})" for v, py in INTERPRETERS.items() if _mcore_of(py) != v]
    if missing:
        pytest.skip(
            f"cross-version checkpoints need both interpreters; missing: {', '.join(missing)} "
            "(make venv-mcore019 builds the 0.19 one; RLRT_MCORE016_PYTHON / "
            "RLRT_MCORE019_PYTHON point elsewhere)"
        )
    roots = {v: tmp_path_factory.mktemp(f"written_by_{v}") for v in INTERPRETERS}
    procs = {v: _probe(INTERPRETERS[v], "save", roots[v]) for v in INTERPRETERS}  # in parallel
    for v, p in procs.items():
        assert _result(p, roots[v], "save")["megatron_core"].startswith(v)
    return roots


@pytest.mark.distributed
def test_checkpoints_load_across_versions(both):
    """0.16 -> 0.19 and 0.19 -> 0.16: parameters, Adam state and the next step bit for bit,
    and the HF export of the other version's checkpoint."""
    procs = {
        (w, r): _probe(INTERPRETERS[r], "load", both[w])
        for w, r in (("0.16", "0.19"), ("0.19", "0.16"))
    }
    for (writer, reader), p in procs.items():
        got = _result(p, both[writer], "load")
        assert got["megatron_core"].startswith(reader)
        assert json.loads((both[writer] / "writer.json").read_text())["megatron_core"].startswith(
            writer
        )
        for key in ("same_params", "same_adam", "same_next", "hf_export"):
            assert got[key], (writer, reader, key, got)


def test_load_error_names_the_writer_and_the_conversion(tmp_path):
    (tmp_path / compat.VERSIONS_FILE).write_text(
        json.dumps({"megatron_core": "0.99.0", "torch": "9.0", "python": "3.99"})
    )
    with pytest.raises(RuntimeError) as info:
        with compat.checkpoint_load_errors(tmp_path):
            raise KeyError("common_state")
    msg = str(info.value)
    assert "megatron-core 0.99.0" in msg and f"megatron-core {compat.MCORE_VERSION}" in msg
    assert "rlrt convert megatron-to-hf" in msg and "hf-to-megatron" in msg
    # no stamp (an older checkpoint): the layout on disk says which family wrote it
    os.remove(tmp_path / compat.VERSIONS_FILE)
    with pytest.raises(RuntimeError, match="megatron-core >= 0.19"):
        with compat.checkpoint_load_errors(tmp_path):
            raise KeyError("x")
    # written by this very version: the original error, unchanged
    (tmp_path / compat.VERSIONS_FILE).write_text(json.dumps(compat.versions()))
    with pytest.raises(KeyError):
        with compat.checkpoint_load_errors(tmp_path):
            raise KeyError("x")


def _fully_reshardable(rank: int, world: int, root: str) -> dict:
    from rlrt_megatron import platform
    from rlrt_megatron.config import OptimizerConfig
    from rlrt_megatron.convert.tiny import tiny_config
    from rlrt_megatron.megatron.train_step import Policy
    from rlrt_megatron.trainer.checkpoint import Checkpointer, adam_step

    platform.init_distributed(1, 1, seed=5)
    policy = Policy(
        tiny_config(vocab_size=256), tp=1, pp=1, optim=OptimizerConfig(lr=1e-2), total_steps=10
    )
    ck = Checkpointer(root)
    ck.optimizer_format = "fully_reshardable"
    seqs, starts = [list(range(3, 15)), list(range(20, 30))], [5, 3]

    def step() -> None:
        mine = [0, 1] if world == 1 else [rank]  # this rank's rows of the mini-batch
        policy.train_minibatch(
            [seqs[i] for i in mine], [starts[i] for i in mine], mine, 7, 64,
            lambda lp, r, t: (-lp.sum() / 14.0, {}),
        )  # fmt: skip

    def moments() -> float:  # sum of squares of this rank's Adam moments (float64)
        total = torch.zeros((), dtype=torch.float64)
        for opt in policy.optimizer.chained_optimizers:
            for st in opt.optimizer.state.values():
                for k in ("exp_avg", "exp_avg_sq"):
                    total += st[k].double().pow(2).sum()
        return float(total)

    if world == 2:  # DP=2 writes
        step()
        ck.save(1, policy.model, policy.optimizer, {})
    else:  # DP=1 reads
        ck.load(ck.latest(), policy.model, policy.optimizer)
    out = {
        "params": {n: p.detach().clone() for n, p in policy.chunks[0].named_parameters()},
        "moments": moments(),
        "adam_step": adam_step(policy.optimizer),
    }
    step()
    out["finite"] = all(torch.isfinite(p).all() for p in policy.chunks[0].parameters())
    return out


@pytest.mark.distributed
def test_fully_reshardable_optimizer_resumes_at_another_dp_size(tmp_path):
    """Written at DP=2, read at DP=1: parameters and Adam moments (sum of both DP shards) match;
    torch Adam's step count survives (megatron's loader alone would raise KeyError 'step')."""
    root = str(tmp_path / "ckpt")
    dp2 = run_distributed(_fully_reshardable, 2, root)
    (dp1,) = run_distributed(_fully_reshardable, 1, root)
    for n, p in dp2[0]["params"].items():
        assert torch.equal(p, dp1["params"][n]), n
    assert dp1["moments"] == pytest.approx(dp2[0]["moments"] + dp2[1]["moments"], rel=1e-12)
    assert dp1["moments"] > 0 and dp1["adam_step"] == dp2[0]["adam_step"] == 1.0
    assert dp1["finite"]


def test_llama3_rope_factors_beyond_megatrons_fixed_ones_match_transformers():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    def rope_for(**scaling):
        rope = {"rope_type": "llama3", "factor": 16.0, **scaling}
        hf = LlamaConfig(
            hidden_size=512, num_attention_heads=4, rope_theta=500_000.0,
            max_position_embeddings=131072, rope_scaling=dict(rope),
        )  # fmt: skip
        model = types.SimpleNamespace(
            rotary_pos_emb=RotaryEmbedding(
                kv_channels=128,
                rotary_percent=1.0,
                rotary_base=500_000.0,
                rope_scaling=True,
                rope_scaling_factor=16.0,
                use_cpu_initialization=True,
            )  # fmt: skip
        )
        before = model.rotary_pos_emb.inv_freq.clone()
        compat.apply_llama3_rope(model, {**rope, "rope_theta": 500_000.0})
        ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
        return before, model.rotary_pos_emb.inv_freq, ref.float()

    custom = dict(low_freq_factor=2.0, high_freq_factor=8.0, original_max_position_embeddings=4096)
    before, after, ref = rope_for(**custom)
    assert not torch.allclose(before, ref)  # megatron's fixed factors would be wrong here
    torch.testing.assert_close(after, ref, rtol=1e-6, atol=0)
    fixed = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    before, after, ref = rope_for(**fixed)
    assert torch.equal(before, after)  # the defaults: megatron's own frequencies, untouched
    torch.testing.assert_close(after, ref, rtol=1e-6, atol=0)


def test_versions_and_supported_range():
    v = compat.versions()
    assert v["megatron_core"] == compat.MCORE_VERSION
    assert compat.mcore_version()[:2] in compat.SUPPORTED
    assert v["python"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}")
