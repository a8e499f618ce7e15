"""GPU: the Transformer Engine layer spec (bf16, FP8 delayed and current scaling) gives logits
close to the local spec with the same weights. Needs CUDA + transformer_engine (gpu extra).

    .venv/bin/python -m pytest -q -m gpu tests/gpu/test_te_spec.py

Tolerances: bf16 TE vs bf16 local differ only by kernel order (fused layernorm-linear, flash
attention): max |diff| <= 5% of the logits' scale. FP8 GEMMs (E4M3 forward) lose ~3 bits of
mantissa: cosine similarity >= 0.99 and max |diff| <= 25% of the logits' scale. Each test prints
a `RESULT` line with the measured figures (run with -s; tools/gpu_check.sh does) so the
tolerances can be tightened from real runs.

Also checked under FP8: the LM head stays Megatron's plain ColumnParallelLinear (TE's
fp8_autocast only changes TE modules, and Megatron enters it inside the decoder block), the
parameters stay plain (not Float8Tensor) tensors, and iter_hf_weights (what the rollout engine
receives) yields plain tensors, bf16 when asked for.
"""

from __future__ import annotations

import os
import re
import socket

import pytest
import torch

pytestmark = pytest.mark.gpu


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def megatron_1gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("transformer_engine.pytorch", reason="needs the gpu extra")
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())).items():  # fmt: skip
        os.environ.setdefault(k, v)
    from rlrt_megatron import platform

    platform.init_distributed(tp=1, pp=1)
    yield
    platform.destroy_distributed()


def _local_to_te_name(name: str, renames: dict[str, str]) -> str:
    m = re.match(r"(.*decoder\.layers\.)(\d+)\.(.*)", name)
    if not m:
        return name
    prefix, idx, rest = m.groups()
    for a, b in renames.items():
        a, b = a.removeprefix("decoder.layers."), b.removeprefix("decoder.layers.")
        if rest == a:
            return f"{prefix}{idx}.{b}"
    return name


def _build(spec: str, fp8=None):
    from rlrt_megatron.convert.tiny import tiny_config
    from rlrt_megatron.megatron.model import build_model
    from rlrt_megatron.megatron.te import fp8_transformer_kwargs

    overrides = fp8_transformer_kwargs(fp8, spec=spec) if fp8 is not None else {}
    hf = tiny_config("qwen3", vocab_size=512)
    return build_model(hf, spec=spec, params_dtype=torch.bfloat16, **overrides)[0]


def _copy_local_into_te(local, te_model) -> None:
    from rlrt_megatron.convert.mapping import spec_key_map

    renames = spec_key_map("local", "te")
    te_params = dict(te_model.named_parameters())
    covered = set()
    with torch.no_grad():
        for name, p in local.named_parameters():
            target = _local_to_te_name(name, renames)
            assert target in te_params, f"{name} -> {target} missing in the TE model"
            assert te_params[target].shape == p.shape, target
            te_params[target].copy_(p)
            covered.add(target)
    assert covered == set(te_params), f"TE params not set: {sorted(set(te_params) - covered)}"


@torch.no_grad()
def _logits(model, tokens):
    model.eval()
    pos = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    return model(tokens, pos, None)[..., :512].float()


def _tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 512, (2, 64), generator=g).cuda()  # 128 tokens: FP8 needs % 16


def test_te_bf16_matches_local(megatron_1gpu):
    local = _build("local")
    te_model = _build("te")
    _copy_local_into_te(local, te_model)
    tokens = _tokens()
    a, b = _logits(local, tokens), _logits(te_model, tokens)
    scale = a.abs().max().item()
    diff = (a - b).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    print(f"\nRESULT te_bf16_max_diff={diff:.4g} te_bf16_rel={diff / scale:.4g} "
          f"te_bf16_cos={cos:.6f} logits_scale={scale:.4g}")  # fmt: skip
    assert diff <= 0.05 * scale


@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_te_fp8_close_to_local(megatron_1gpu, recipe):
    from rlrt_megatron.megatron.te import FP8Config

    if recipe == "current":
        import transformer_engine

        major, minor = (int(x) for x in transformer_engine.__version__.split(".")[:2])
        if (major, minor) < (2, 2):
            pytest.skip("current scaling needs TE >= 2.2")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs Ada/Hopper or newer")
    local = _build("local")
    fp8 = _build("te", FP8Config(enabled=True, recipe=recipe, amax_history_len=16))
    _copy_local_into_te(local, fp8)
    tokens = _tokens()
    for _ in range(3):  # delayed scaling: let the amax history see real activations
        _logits(fp8, tokens)
    a, b = _logits(local, tokens), _logits(fp8, tokens)
    scale = a.abs().max().item()
    diff = (a - b).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    print(f"\nRESULT te_fp8_{recipe}_max_diff={diff:.4g} te_fp8_{recipe}_rel={diff / scale:.4g} "
          f"te_fp8_{recipe}_cos={cos:.6f} logits_scale={scale:.4g}")  # fmt: skip
    assert cos >= 0.99 and diff <= 0.25 * scale
    _check_lm_head_and_export_are_bf16(fp8)


def _check_lm_head_and_export_are_bf16(model) -> None:
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from rlrt_megatron.convert.load import iter_hf_weights

    assert type(model.output_layer) is ColumnParallelLinear, type(model.output_layer)
    for name, p in model.named_parameters():  # fp8_param is off: no Float8Tensor params
        assert type(p.data) is torch.Tensor, (name, type(p.data))
        assert p.dtype in (torch.bfloat16, torch.float32), (name, p.dtype)
    for name, t in iter_hf_weights([model]):
        assert type(t) is torch.Tensor and t.dtype in (torch.bfloat16, torch.float32), name
    for name, t in iter_hf_weights([model], dtype=torch.bfloat16):
        assert type(t) is torch.Tensor and t.dtype == torch.bfloat16, (name, t.dtype)
