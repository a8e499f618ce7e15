"""The `torch` layer spec: Megatron's local modules with PyTorch SDPA attention, no TE needed.

Megatron's `local` spec attends through `DotProductAttention`, which materialises the
`[b, heads, s, s]` score matrix (and our packing adds a dense `[s, s]` block-causal mask): fine
for CPU tests, quadratic in memory and time on a GPU. `model.spec=torch` keeps every parameter
and name of the local spec (the converter's table, `convert/mapping.py`, applies unchanged) and
swaps three modules:

* core attention -> :class:`SDPAttention`: `torch.nn.functional.scaled_dot_product_attention`
  (flash / memory-efficient kernels on CUDA), causal via `is_causal=True`, never an `[s, s]`
  mask. Packed rows arrive as `thd` (`packed_seq_params.cu_seqlens_q`, one row per
  micro-batch, like Transformer Engine): every sequence of the row gets its own causal SDPA
  call, so tokens never see another sequence and nothing is quadratic in the *row* length.
* self attention -> :class:`SDPASelfAttention` (Megatron's `SelfAttention`, unchanged
  parameters): copies `cu_seqlens` to the host once per micro-batch (no per-layer host syncs
  in the per-sequence split or in Megatron's thd RoPE) and hands RoPE to the core attention,
  which rotates q and k with cos/sin tables built once per micro-batch for all layers and
  saves only those tables for backward (:class:`_Rotary`).
* norms -> :class:`~rlrt_megatron.megatron.norm.TorchNorm`: `torch.nn.RMSNorm` / `LayerNorm`
  created in `params_dtype` (final norm included), sequence parallelism supported
  (`megatron/norm.py`). Megatron's `WrappedTorchNorm` creates fp32 weights, which
  `build_model` has to cast afterwards: with bf16 activations and fp32 weights torch's
  `rms_norm` cannot use its fused kernel ("Mismatch dtype between input and weight").

GQA: where SDPA's flash kernel takes grouped kv heads (CUDA, bf16/fp16; asked once per shape
via `torch.backends.cuda.can_use_flash_attention`) they go to SDPA as they are
(`enable_gqa=True`, no copy); otherwise (fp32, CPU) they are expanded with `repeat_interleave`,
as the local spec does, so the efficient/math kernels can run (with `enable_gqa` and no flash,
SDPA would silently take the math kernel, which materialises the scores). Query head `h` uses
kv head `h // (heads / groups)` in both (Megatron's `linear_qkv` grouping).

RoPE positions: in `thd` each packed sequence is rotated from position 0 (as Megatron's thd
RoPE does); the local spec's mask layout rotates by the row position. Attention scores depend
only on position differences within one sequence, so both give the same logits (up to
rounding; tests/unit/test_attention.py checks 1e-5 in fp32).

Not supported (raise at construction): context parallelism, softmax types other than vanilla,
sliding windows, attention bias. Interleaved, partial or yarn RoPE and inference contexts fall
back to Megatron's own RoPE.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.attention import SelfAttention

from rlrt_megatron.megatron.norm import TorchNorm, block_spec, swap_norms

__all__ = [
    "SDPAParams",
    "SDPASelfAttention",
    "SDPAttention",
    "TorchNorm",
    "flash_takes_gqa",
    "host_packed_seq_params",
    "packed_seqlens",
    "rope_tables",
    "sdpa",
    "torch_block_spec",
]


# Per-tensor results (host copies of cu_seqlens, their lengths as Python ints), computed once
# per micro-batch and reused by every layer. Keyed by id and checked by a weak reference and the
# tensor's version (tensors compare elementwise, so they cannot be dict keys by value).
_CACHE: dict[tuple[str, int], tuple[weakref.ref, int, Any]] = {}


def _cached(kind: str, t: torch.Tensor, make: Any) -> Any:
    key = (kind, id(t))
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2]
    value = make(t)
    if len(_CACHE) >= 64:
        for k in [k for k, v in _CACHE.items() if v[0]() is None]:
            del _CACHE[k]
    _CACHE[key] = (weakref.ref(t), t._version, value)
    return value


def packed_seqlens(cu_seqlens: torch.Tensor) -> list[int]:
    """Python list of the sequence lengths in `cu_seqlens` (cached per tensor and version)."""
    return _cached("lens", cu_seqlens, lambda t: (t[1:] - t[:-1]).tolist())


_CU_FIELDS = ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded")


def host_packed_seq_params(psp: Any) -> Any:
    """`psp` with its `cu_seqlens` tensors on the host, copied once per micro-batch.

    Megatron's unfused thd RoPE (`_apply_rotary_pos_emb_thd`) reads the sequence lengths with
    `.tolist()` / `.item()` for q and for k in every layer: with device tensors that is a few host
    syncs per layer (the CPU stops running ahead of the GPU); with host tensors none. Only the
    RoPE and :class:`SDPAttention` read them in the torch spec (TE would need device tensors).
    """

    def make(_: torch.Tensor) -> Any:
        copies: dict[int, torch.Tensor] = {}
        fields = {}
        for f in _CU_FIELDS:
            t = getattr(psp, f, None)
            if t is not None:
                fields[f] = copies.setdefault(id(t), t.to("cpu"))
        return dataclasses.replace(psp, **fields)

    return psp if psp.cu_seqlens_q is None else _cached("host", psp.cu_seqlens_q, make)


@dataclasses.dataclass
class SDPAParams(PackedSeqParams):
    """What :class:`SDPASelfAttention` hands its core attention: the packed-sequence fields
    (`qkv_format` "thd", host `cu_seqlens`) or `qkv_format="sbhd"` for unpacked rows, plus the
    RoPE frequencies `[n, 1, 1, d]` the core attention applies to q and k (None: already
    applied). Riding on `packed_seq_params` keeps it correct under activation recomputation,
    which calls the core attention again with the same arguments."""

    rotary_freqs: torch.Tensor | None = None


class SDPASelfAttention(SelfAttention):
    """Megatron's `SelfAttention` (same parameters and names) for the torch spec.

    * `thd`: RoPE and the core attention get host copies of `cu_seqlens`
      (:func:`host_packed_seq_params`).
    * RoPE moves into :class:`SDPAttention` (:class:`_Rotary`): cos/sin tables built once per
      micro-batch for all layers (Megatron rebuilds them for q and for k in every layer, per
      packed sequence) and nothing but those tables saved for backward (Megatron keeps the
      rotated-half copies and the q/k-norm outputs). Falls back to Megatron's RoPE for
      inference, tuples of distinct q/k embeddings, partial or interleaved rotary and yarn.
    """

    def _own_rope(self, freqs: Any, kwargs: dict) -> bool:
        cfg = self.config
        return (
            isinstance(freqs, torch.Tensor)
            and freqs.shape[-1] == cfg.kv_channels
            and kwargs.get("inference_context") is None
            and kwargs.get("inference_params") is None
            and not cfg.rotary_interleaved
            and not cfg.multi_latent_attention
            and not cfg.apply_rope_fusion
            and not hasattr(cfg, "yarn_rotary_scaling_factor")
            and getattr(cfg, "mrope_section", None) is None
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        psp = kwargs.get("packed_seq_params")
        thd = psp is not None and psp.qkv_format == "thd"
        if thd:
            psp = host_packed_seq_params(psp)
        freqs = kwargs.get("rotary_pos_emb")
        if isinstance(freqs, tuple) and len(freqs) == 2 and freqs[0] is freqs[1]:
            freqs = freqs[0]
        if len(args) <= 1 and self._own_rope(freqs, kwargs) and (thd or psp is None):
            kwargs["rotary_pos_emb"] = None
            if thd:
                psp = SDPAParams(**{f.name: getattr(psp, f.name)
                                    for f in dataclasses.fields(PackedSeqParams)})  # fmt: skip
                psp.rotary_freqs = freqs
            else:
                psp = SDPAParams(qkv_format="sbhd", rotary_freqs=freqs)
        if psp is not None:
            kwargs["packed_seq_params"] = psp
        return super().forward(*args, **kwargs)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _Rotary(torch.autograd.Function):
    """`x * cos + rotate_half(x) * sin` (Megatron's non-interleaved RoPE, same ops and rounding)
    saving only the shared cos/sin tables: the input gradient is
    `g * cos + rotate_half^T(g * sin)` with `rotate_half^T([u1, u2]) = [u2, -u1]`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return x * cos + _rotate_half(x) * sin

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        cos, sin = ctx.saved_tensors
        u1, u2 = (grad * sin).chunk(2, dim=-1)
        return grad * cos + torch.cat((u2, -u1), dim=-1), None, None


def rope_tables(
    freqs: torch.Tensor, lens: list[int] | None, cu_host: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of `freqs` in `dtype`: `[s, 1, 1, d]` for sbhd rows (`lens` None), or `[t, 1, d]`
    at each packed token's position within its own sequence (thd), cached per micro-batch."""

    def make(_: torch.Tensor) -> dict:
        return {}

    # one dict per micro-batch (thd: its host cu_seqlens) or per freqs tensor (sbhd)
    tables = _cached("rope", cu_host if cu_host is not None else freqs, make)
    key = (id(freqs), freqs._version, dtype)
    hit = tables.get(key)
    if hit is not None and hit[0]() is freqs:
        return hit[1], hit[2]
    f = freqs
    if lens is not None:
        pos = torch.cat([torch.arange(n) for n in lens]).to(freqs.device, non_blocking=True)
        f = freqs.reshape(freqs.shape[0], -1).index_select(0, pos).unsqueeze(1)  # [t, 1, d]
    cos, sin = torch.cos(f).to(dtype), torch.sin(f).to(dtype)
    tables[key] = (weakref.ref(freqs), cos, sin)
    return cos, sin


@functools.lru_cache(maxsize=32)
def flash_takes_gqa(device: torch.device, dtype: torch.dtype, heads: int, groups: int,
                    head_dim: int) -> bool:  # fmt: skip
    """Whether SDPA's flash kernel can attend with grouped kv heads (`enable_gqa`) here; when
    it cannot, SDPA would silently use the math kernel, so the kv heads are expanded instead."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        from torch.backends.cuda import SDPAParams, can_use_flash_attention

        q = torch.empty(1, heads, 8, head_dim, device=device, dtype=dtype)
        k = torch.empty(1, groups, 8, head_dim, device=device, dtype=dtype)
        return bool(can_use_flash_attention(SDPAParams(q, k, k, None, 0.0, True, True), False))
    except Exception:  # an older/newer SDPAParams signature: expanding is always correct
        return False


def _native_gqa(q: torch.Tensor, k: torch.Tensor) -> bool:
    return flash_takes_gqa(q.device, q.dtype, q.shape[1], k.shape[1], q.shape[-1])


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool = True,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    native_gqa: bool | None = None,
) -> torch.Tensor:
    """SDPA on `[b, heads, s, d]` query and `[b, groups, s, d]` key/value -> `[b, heads, s, d]`.

    `mask`: bool, True = may attend (SDPA's convention), broadcast to `[b, heads, s, s]`; with a
    mask `causal` is ignored. `native_gqa`: pass grouped kv heads to SDPA (`enable_gqa`) instead
    of expanding them (default: on CUDA in bf16/fp16, see the module docstring).
    """
    rep = q.shape[1] // k.shape[1]
    kw: dict[str, Any] = {}
    if rep > 1:
        if native_gqa if native_gqa is not None else _native_gqa(q, k):
            kw["enable_gqa"] = True
        else:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal and mask is None,
        scale=scale, **kw,
    )  # fmt: skip


class SDPAttention(torch.nn.Module):
    """Core attention over `scaled_dot_product_attention`, a drop-in for megatron-core 0.16's
    `DotProductAttention` / `TEDotProductAttention` inside `SelfAttention`.

    Inputs: `sbhd` query `[s, b, heads, d]`, key/value `[s, b, groups, d]` (this TP rank's heads)
    -> `[s, b, heads * d]`; or `thd` (with `packed_seq_params.qkv_format == "thd"`) query
    `[t, heads, d]`, key/value `[t, groups, d]` -> `[t, heads * d]`, attention causal within each
    `cu_seqlens_q` segment. An explicit `attention_mask` (bool, True = masked out, Megatron's
    convention, `[b, 1, s, s]`) replaces the causal mask in `sbhd`.
    """

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: Any,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
    ) -> None:
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.transformer.enums import AttnMaskType
        from megatron.core.utils import divide

        super().__init__()
        for ok, what in (
            (config.context_parallel_size == 1, "context parallelism (context_parallel_size > 1)"),
            (config.softmax_type == "vanilla", f"softmax_type={config.softmax_type!r}"),
            (config.window_size is None, "sliding-window attention (window_size)"),
        ):
            if not ok:
                raise ValueError(f"model.spec=torch does not support {what}; use model.spec=te")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"model.spec=torch attends causally only, got {attn_mask_type}")
        self.config = config
        self.layer_number = max(1, layer_number)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.head_dim = config.kv_channels
        # Megatron's apply_query_key_layer_scaling divides the scale by the layer number and the
        # softmax multiplies it back: the net scale is this one.
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = float(
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: Any = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("model.spec=torch does not support attention_bias")
        p = self.dropout_p if self.training else 0.0
        if p > 0.0 and not self.config.sequence_parallel:
            from megatron.core import tensor_parallel

            # TP ranks hold different heads: dropout draws from the model-parallel RNG stream
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self._attend(query, key, value, attention_mask, packed_seq_params, p)
        return self._attend(query, key, value, attention_mask, packed_seq_params, p)

    def _attend(self, query, key, value, attention_mask, packed_seq_params, p):
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        freqs = getattr(packed_seq_params, "rotary_freqs", None)
        if freqs is not None:  # RoPE handed over by SDPASelfAttention
            cu = packed_seq_params.cu_seqlens_q if thd else None
            lens = packed_seqlens(cu) if thd else None
            cos, sin = rope_tables(freqs, lens, cu, query.dtype)
            query, key = _Rotary.apply(query, cos, sin), _Rotary.apply(key, cos, sin)
        if thd:
            if attention_mask is not None:
                raise ValueError("thd (packed_seq_params) takes no attention_mask")
            return self._attend_thd(query, key, value, packed_seq_params, p)
        s, b = query.shape[:2]
        mask = None if attention_mask is None else ~attention_mask
        out = sdpa(
            query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3),
            scale=self.scale, mask=mask, dropout_p=p,
        )  # fmt: skip
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)  # [b, h, s, d] -> [s, b, h * d]

    def _attend_thd(self, query, key, value, packed_seq_params, p):
        cu_q, cu_kv = packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv
        if packed_seq_params.cu_seqlens_q_padded is not None:
            cu_q = packed_seq_params.cu_seqlens_q_padded
        if packed_seq_params.cu_seqlens_kv_padded is not None:
            cu_kv = packed_seq_params.cu_seqlens_kv_padded
        if cu_kv is not None and cu_kv is not cu_q and not torch.equal(cu_kv, cu_q):
            raise ValueError("model.spec=torch: self-attention needs cu_seqlens_kv == cu_seqlens_q")
        lens = packed_seqlens(cu_q)
        if sum(lens) != query.shape[0]:
            raise ValueError(
                f"cu_seqlens cover {sum(lens)} tokens but the packed row has {query.shape[0]}"
            )
        # [t, h, d] -> [1, h, t, d] views; each sequence is a causal SDPA call of its own
        # (empty segments are skipped: fused kernels reject zero-length sequences)
        # Contiguous first: key/value arrive as strided views of Megatron's fused qkv, and on the
        # H200 (torch 2.11) flash with grouped kv heads gave a different result for such views
        # than for the same sequence attended alone (tests/gpu/test_torch_spec_gpu.py); the copy
        # is O(t * heads * d), small next to the attention itself.
        q, k, v = (x.contiguous().transpose(0, 1).unsqueeze(0) for x in (query, key, value))
        if len(lens) == 1:
            outs = [sdpa(q, k, v, scale=self.scale, dropout_p=p)]
        else:
            parts = zip(lens, *(x.split(lens, dim=2) for x in (q, k, v)), strict=True)
            outs = [sdpa(qi, ki, vi, scale=self.scale, dropout_p=p) for n, qi, ki, vi in parts if n]
        # [1, h, n, d] -> [n, h, d] per sequence, back to back -> [t, h * d]
        outs = [o.squeeze(0).transpose(0, 1) for o in outs]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        return out.reshape(query.shape[0], -1)


def torch_layer_spec(layer: Any) -> Any:
    """A copy of a local-spec layer `ModuleSpec` with the `torch` spec's pieces swapped in
    (:class:`SDPAttention`, :class:`TorchNorm`); the MLP (dense or MoE) is kept."""
    layer = swap_norms(layer, TorchNorm)
    sub = layer.submodules
    sub.self_attention.module = SDPASelfAttention
    sub.self_attention.submodules.core_attention = SDPAttention
    return layer


def torch_block_spec(config: Any, vp_stage: int | None = None):
    """`TransformerBlockSubmodules` of the `torch` spec for this pipeline (virtual) stage:
    the local layer spec with :class:`SDPAttention` and :class:`TorchNorm` (final norm too)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    layer = torch_layer_spec(
        get_gpt_layer_local_spec(
            qk_layernorm=config.qk_layernorm, normalization=config.normalization
        )
    )
    return block_spec(config, layer, TorchNorm, vp_stage=vp_stage)
