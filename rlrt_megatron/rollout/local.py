"""A rollout engine on transformers, in the trainer's process: CPU tests, the demo, small models.

Sampling is our own KV-cached decode loop (not `model.generate`) so that the behavior log-probs, the
padded-vocabulary mask and the per-row random streams are explicit:

- Rows are left-padded; position ids count real tokens only, so a row's logits do not depend on
  the other rows of the batch (up to float rounding).
- Behavior log-probs follow SGLang's default (`SGLANG_RETURN_ORIGINAL_LOGPROB` unset): the
  log-softmax of the logits divided by the temperature, over the full (true) vocabulary, BEFORE
  top-p / top-k truncation. With temperature 1 they are the model's raw log-probs, which is what
  the trainer recomputes; with another temperature the trainer must divide its logits by it too.
  Greedy decoding (temperature 0) reports the raw log-softmax.
- Ids >= the tokenizer's vocabulary (embedding rows padded for TP or to a round size, like Qwen3's
  151936 rows for 151669 tokens) get -inf logits: never sampled, no probability mass.
- Each completion draws from its own `torch.Generator` seeded from (call seed, request index,
  sample index): the same seed gives the same completions whatever else is in the batch. The call
  seed is `SamplingParams.seed` when set (the trainer passes `rollout.seed + step`, so a resumed
  run samples what the uninterrupted one did), else derived from the engine seed and a call
  counter (saved by `state_dict()`).
- Stop: an eos id (tokenizer eos, the generation config's eos ids, `stop_token_ids`) is kept as the
  last token; a stop string ends the completion after the token that completed it, and the text
  is cut before the stop string (SGLang's default), the token ids are not.
- MoE routing replay (`record_experts`): every completion's `meta["routed_experts"]` holds the
  experts each token was routed to while sampling, `[prompt + response - 1, moe_layers, k]`
  (uint8, or int16 past 256 experts): the prompt's from the prefill, each response token's from
  the decode step that fed it; the last token is never fed (SGLang's `return_routed_experts`
  covers the same `seqlen - 1` tokens).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from rlrt_megatron.rollout.base import Completion, GenerateRequest, SamplingParams
from rlrt_megatron.rollout.moe_routing import RoutedExperts, expert_dtype, fused_expert_slot


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


class LocalEngine:
    """`RolloutEngine` on a transformers causal LM.

    Args:
        model_dir_or_model: a Hugging Face checkpoint directory or an already built
            `PreTrainedModel` (used in place, not copied).
        tokenizer: a tokenizer or its directory; None loads it from `model_dir_or_model`.
        device: torch device of the model.
        dtype: parameter dtype (float32 on CPU keeps log-probs exact to ~1e-6).
        seed: base seed for calls whose `SamplingParams.seed` is None.
        max_batch_rows: rows (requests x n) decoded together; more are done in chunks.
        stop_token_ids: extra ids that end a completion (besides the eos ids).
        vocab_size: ids at or above this are never sampled (default: `len(tokenizer)`).
        attn_implementation: transformers attention backend when loading from a directory.
        record_experts: MoE routing replay: record each token's experts (module docstring).
        length_tail: benchmark workload (`benchmarks/long_tail.py`): each rollout is exactly as
            long as a heavy-tailed length drawn from its seed (`length_cap`, at most
            max_new_tokens): eos cannot be drawn before it (like a top-k truncation: the
            reported log-probs stay the model's), and the rollout stops there ("length").
    """

    def __init__(
        self,
        model_dir_or_model: str | Path | torch.nn.Module,
        tokenizer: Any = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        *,
        max_batch_rows: int = 64,
        stop_token_ids: Sequence[int] = (),
        vocab_size: int | None = None,
        attn_implementation: str = "sdpa",
        length_tail: bool = False,
        record_experts: bool = False,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device)
        if isinstance(model_dir_or_model, (str, Path)):
            path = Path(model_dir_or_model)
            if not (path / "config.json").exists():
                raise FileNotFoundError(
                    f"LocalEngine: {path} has no config.json; pass a Hugging Face checkpoint "
                    "directory (e.g. from `rlrt convert` or `make_tiny_model`) or a model object"
                )
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, attn_implementation=attn_implementation
            )
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(str(path))
        else:
            model = model_dir_or_model
            if tokenizer is None:
                raise ValueError("LocalEngine: pass the tokenizer along with a model object")
        if isinstance(tokenizer, (str, Path)):
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.seed = int(seed)
        self.max_batch_rows = int(max_batch_rows)
        self.length_tail = bool(length_tail)
        self.record_experts = bool(record_experts)
        if self.record_experts and not RoutedExperts(self.model).layers:
            raise ValueError(
                "LocalEngine: record_experts (model.moe.routing_replay=rollout) needs a MoE model; "
                f"{type(self.model).__name__} has no routers"
            )
        self.model_vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.vocab_size = min(int(vocab_size or len(tokenizer)), self.model_vocab_size)
        eos = set(_as_id_list(getattr(tokenizer, "eos_token_id", None)))
        gen_cfg = getattr(self.model, "generation_config", None)
        eos |= set(_as_id_list(getattr(gen_cfg, "eos_token_id", None)))
        eos |= set(_as_id_list(list(stop_token_ids)))
        self.eos_token_ids = sorted(i for i in eos if i is not None)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad if pad is not None else (self.eos_token_ids or [0])[0])
        self._cache_kw = (
            "cache"
            if "cache" in inspect.signature(self.model.forward).parameters
            else "past_key_values"
        )
        self._weight_version = 0
        self._calls = 0
        self._alive = True

    # ------------------------------------------------------------------ protocol
    @property
    def weight_version(self) -> int:
        return self._weight_version

    def health(self) -> bool:
        return self._alive

    def shutdown(self) -> None:
        self._alive = False
        self.model = None  # type: ignore[assignment]

    def state_dict(self) -> dict[str, int]:
        """The call counter that derives seeds of calls without `SamplingParams.seed`."""
        return {"calls": self._calls, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._calls = int(state["calls"])
        self.seed = int(state.get("seed", self.seed))

    @torch.no_grad()
    def generate(
        self, requests: list[GenerateRequest], sampling: SamplingParams
    ) -> list[list[Completion]]:
        """`sampling.n` completions per request, in request order (see the module docstring)."""
        self._check_alive()
        _validate_sampling(sampling)
        call_seed = sampling.seed if sampling.seed is not None else self._derived_seed()
        self._calls += 1
        rows: list[tuple[int, int, list[int]]] = []
        for i, req in enumerate(requests):
            ids = list(req.prompt_token_ids)
            if not ids:
                raise ValueError(
                    f"LocalEngine.generate: request {i} ({req.request_id!r}) has no prompt tokens"
                )
            bad = [t for t in ids if not 0 <= t < self.model_vocab_size]
            if bad:
                raise ValueError(
                    f"LocalEngine.generate: request {i} ({req.request_id!r}) has token ids "
                    f"{bad[:5]} outside the model's vocabulary [0, {self.model_vocab_size}); "
                    "tokenize with the engine's tokenizer"
                )
            rows.extend((i, j, ids) for j in range(sampling.n))
        results: list[list[Completion]] = [[] for _ in requests]
        for lo in range(0, len(rows), self.max_batch_rows):
            chunk = rows[lo : lo + self.max_batch_rows]
            gens = [_row_generator(call_seed, i, j) for i, j, _ in chunk]
            caps = None
            if self.length_tail:
                caps = [length_cap(call_seed, i, j, sampling.max_new_tokens) for i, j, _ in chunk]
            outs = self._decode([ids for _, _, ids in chunk], gens, sampling, caps)
            for (i, _j, ids), (toks, lps, reason, text, routed) in zip(chunk, outs, strict=True):
                meta: dict[str, Any] = {"seed": call_seed}
                if routed is not None:
                    meta["routed_experts"] = routed
                results[i].append(
                    Completion(
                        request_id=requests[i].request_id,
                        prompt_token_ids=ids,
                        token_ids=toks,
                        text=text,
                        logprobs=lps,
                        finish_reason=reason,
                        weight_version=self._weight_version,
                        meta=meta,
                    )
                )
        return results

    @torch.no_grad()
    def update_weights(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        version: int,
        *,
        strict: bool = True,
    ) -> None:
        """Load full Hugging Face-named tensors in place and set `weight_version = version`.

        Everything is validated before anything is copied: an unknown name, a shape mismatch, or
        (with `strict`) a parameter left out raises ValueError and leaves the weights untouched.
        Tied embeddings: either `lm_head.weight` or `model.embed_tokens.weight` updates both.
        """
        self._check_alive()
        state = self.model.state_dict(keep_vars=True)
        tied = _tied_groups(self.model, state)
        incoming: dict[str, torch.Tensor] = {}
        unknown, mis_shaped = [], []
        slots: dict[str, tuple[str, torch.Tensor]] = {}  # per-expert name -> fused view (MoE)
        for name, tensor in named_tensors:
            if name not in state and (slot := fused_expert_slot(name, state)) is not None:
                slots[name] = slot
            target = slots[name][1] if name in slots else state.get(name)
            if target is None:
                unknown.append(name)
                continue
            if tuple(tensor.shape) != tuple(target.shape):
                mis_shaped.append(
                    f"{name}: expected {tuple(target.shape)}, got {tuple(tensor.shape)}"
                )
                continue
            incoming[name] = tensor
        if unknown:
            hints = [
                f"{u!r} (did you mean {m[0]!r}?)"
                if (m := difflib.get_close_matches(u, state, 1))
                else repr(u)
                for u in unknown[:5]
            ]
            raise ValueError(
                f"LocalEngine.update_weights: {len(unknown)} unknown parameter name(s): "
                f"{', '.join(hints)}; send Hugging Face names (convert Megatron names with the "
                "convert/ mapping)"
            )
        if mis_shaped:
            raise ValueError(
                "LocalEngine.update_weights: shape mismatch for "
                + "; ".join(mis_shaped[:5])
                + " (send full, unsharded tensors with the vocabulary padding removed)"
            )
        if strict:
            covered = set(incoming) | {fused for fused, _ in slots.values()}
            missing = [
                n
                for n in state
                if n not in covered
                and not (tied.get(n, set()) & covered)
                and isinstance(state[n], torch.nn.Parameter)
            ]
            if missing:
                raise ValueError(
                    f"LocalEngine.update_weights: {len(missing)} parameter(s) not sent, e.g. "
                    f"{missing[:5]}; send every parameter (or strict=False for a partial update)"
                )
        for name, tensor in incoming.items():
            dst = slots[name][1] if name in slots else state[name].data
            dst.copy_(tensor.detach().to(device=dst.device, dtype=dst.dtype))
        self._weight_version = int(version)

    # ------------------------------------------------------------------ internals
    def _check_alive(self) -> None:
        if not self._alive:
            raise RuntimeError("LocalEngine: used after shutdown(); create a new engine")

    def _derived_seed(self) -> int:
        return random.Random(f"{self.seed}:{self._calls}").getrandbits(62)

    def _forward(self, ids, mask, pos, cache):
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: cache},
        )
        return out.logits[:, -1, :].float()

    def _decode(
        self,
        prompts: list[list[int]],
        gens: list[torch.Generator],
        sp: SamplingParams,
        caps: list[int] | None = None,
    ) -> list[tuple[list[int], list[float], str, str, torch.Tensor | None]]:
        """Decode a batch of rows; tokens, log-probs and stop flags stay on the model's device.
        Per row: (tokens, log-probs, finish reason, text, routed experts or None).

        The host reads the batch's state every `_SYNC_EVERY` steps (to stop when every row has
        finished) and once at the end, never per token. Stop strings need the text of every
        row at every step, so with `sp.stop` the tokens come to the host each step.
        """
        from transformers import DynamicCache

        b = len(prompts)
        dev = self.device
        width = max(len(p) for p in prompts)
        max_new = sp.max_new_tokens
        ids = torch.full((b, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((b, width + max_new), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p) :] = 1  # generated positions are always attended
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        toks = torch.zeros((b, max(max_new, 1)), dtype=torch.long, device=dev)
        lps = torch.zeros((b, max(max_new, 1)), dtype=torch.float32, device=dev)
        length = torch.full((b,), max_new, dtype=torch.long, device=dev)  # incl. the stop token
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        capped = torch.zeros(b, dtype=torch.bool, device=dev)
        cap = None if caps is None else torch.tensor(caps, dtype=torch.long, device=dev)
        eos = torch.tensor(self.eos_token_ids or [-1], dtype=torch.long, device=dev)
        host = _StopStrings(self.tokenizer, sp.stop, b) if sp.stop else None
        steps = 0
        unif = None
        if max_new > 0 and sp.temperature > 0:
            # each row's uniforms for every step, drawn from its own generator in one call
            rows = [torch.rand(max_new, generator=g, dtype=torch.float64) for g in gens]
            unif = torch.stack(rows).to(dev, non_blocking=True)
        recorder = RoutedExperts(self.model) if self.record_experts else None
        with recorder or contextlib.nullcontext():
            if max_new > 0:
                logits = self._forward(ids, mask[:, :width], pos, cache)
            for step in range(max_new):
                no_eos = None if cap is None else cap > step + 1
                nxt, lp = self._sample(
                    logits, gens, sp, None if unif is None else unif[:, step], no_eos
                )
                toks[:, step], lps[:, step] = nxt, lp
                steps = step + 1
                ended = torch.isin(nxt, eos)
                if host is not None:
                    ended = ended | host.update(nxt.tolist(), done.tolist()).to(dev)
                ended &= ~done
                if cap is not None:  # the length_tail workload: a per-row length limit
                    cut = (cap <= step + 1) & ~done & ~ended
                    capped |= cut
                    ended |= cut
                length = torch.where(ended, step + 1, length)
                done |= ended
                check = host is not None or step % _SYNC_EVERY == _SYNC_EVERY - 1
                if step + 1 == max_new or (check and bool(done.all())):
                    break
                # Finished rows keep decoding; their outputs past `length` are ignored.
                pos = pos[:, -1:] + 1
                logits = self._forward(nxt[:, None], mask[:, : width + step + 1], pos, cache)
        n_tok = length.clamp(max=steps).tolist()
        reasons = (done & ~capped).tolist()
        toks_h, lps_h = toks[:, :steps].tolist(), lps[:, :steps].tolist()
        routed = None
        if recorder is not None:
            pads = [width - len(p) for p in prompts]
            routed = _routed_rows(recorder, b, width, pads, n_tok, self.model.config)
        out = []
        for r in range(b):
            t, lp = toks_h[r][: n_tok[r]], lps_h[r][: n_tok[r]]
            text = self.tokenizer.decode(t, skip_special_tokens=True)
            if host is not None and host.by_string[r]:
                cuts = [text.find(s) for s in sp.stop if s in text]
                if cuts:
                    text = text[: min(cuts)]
            out.append(
                (
                    t,
                    lp,
                    "stop" if reasons[r] else "length",
                    text,
                    None if routed is None else routed[r],
                )
            )
        return out

    def _sample(
        self,
        logits: torch.Tensor,
        gens: list[torch.Generator],
        sp: SamplingParams,
        uniforms: torch.Tensor | None = None,
        no_eos: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`sample_next`; rows where `no_eos` is True cannot draw an eos id (`length_tail`)."""
        ban = None
        if no_eos is not None and self.eos_token_ids:
            ban = (no_eos, torch.tensor(self.eos_token_ids, device=logits.device))
        return sample_next(
            logits, gens, sp.temperature, sp.top_k, sp.top_p, self.vocab_size, uniforms=uniforms,
            ban=ban,
        )  # fmt: skip


def _routed_rows(
    rec: RoutedExperts, b: int, width: int, pads: list[int], n_tok: list[int], config: Any
) -> list[torch.Tensor]:
    """Each row's experts `[prompt + n - 1, moe_layers, k]` on the host from the recorder's
    forwards: the left-padded prefill `[b * width]` tokens, then one `[b]` call per decode step
    (the step that fed response token s)."""
    dtype = expert_dtype(int(getattr(config, "num_experts", 0) or 0))
    if not rec.calls:  # max_new_tokens=0: nothing was forwarded
        k = int(config.num_experts_per_tok)
        return [torch.zeros((0, rec.layers, k), dtype=dtype) for _ in range(b)]
    prefill = rec.per_token(0).view(b, width, rec.layers, -1).to("cpu", dtype)
    decode = [rec.per_token(j).to("cpu", dtype) for j in range(1, len(rec.calls))]
    steps = torch.stack(decode) if decode else prefill.new_zeros((0, b, *prefill.shape[2:]))
    return [torch.cat([prefill[r, pads[r] :], steps[: max(n_tok[r] - 1, 0), r]]) for r in range(b)]


# Decode steps between the host's checks of "has every row finished?" (each check syncs).
_SYNC_EVERY = 8


class _StopStrings:
    """Host-side stop-string detection: the decoded tail of each row after every step."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], rows: int) -> None:
        self.tokenizer, self.stop = tokenizer, list(stop)
        # A character takes at most 4 byte-level tokens: decode enough tail to see a stop string.
        self.tail = 4 * max(len(s) for s in self.stop) + 4
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.by_string = [False] * rows

    def update(self, nxt: list[int], done: list[bool]) -> torch.Tensor:
        hit = [False] * len(nxt)
        for r, t in enumerate(nxt):
            if done[r]:
                continue
            self.tokens[r].append(t)
            tail = self.tokenizer.decode(self.tokens[r][-self.tail :])
            if any(s in tail for s in self.stop):
                hit[r] = self.by_string[r] = True
        return torch.tensor(hit, dtype=torch.bool)


def sample_next(
    logits: torch.Tensor,
    gens: Sequence[torch.Generator],
    temperature: float,
    top_k: int = -1,
    top_p: float = 1.0,
    vocab_size: int | None = None,
    *,
    uniforms: torch.Tensor | None = None,
    ban: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token per row of `logits` [B, V] and its behavior log-prob (SGLang's default:
    log_softmax(logits / temperature) before top-k/top-p; raw log_softmax when greedy).
    `ban` = (rows [B] bool, ids): those ids are never drawn in those rows, a truncation like
    top-k (the reported log-prob is still the untruncated one).

    Ids >= `vocab_size` are never drawn. Row r draws from `gens[r]` only, or uses `uniforms[r]`
    (float64 in [0, 1), drawn from that generator beforehand: a decode loop draws every step's
    uniforms of a row in one call instead of one call per row per step).
    """
    if vocab_size is not None and logits.shape[-1] > vocab_size:
        logits = logits.clone()
        logits[:, vocab_size:] = float("-inf")
    if temperature <= 0.0:
        logp = torch.log_softmax(logits, dim=-1)
        nxt = logits.argmax(dim=-1)
        return nxt, logp.gather(1, nxt[:, None]).squeeze(1)
    scaled = logits / temperature
    logp = torch.log_softmax(scaled, dim=-1)
    filtered = _top_k_top_p(scaled, top_k, top_p)
    if ban is not None:
        rows, ids = ban
        hit = torch.zeros_like(filtered, dtype=torch.bool)
        hit[:, ids] = True
        filtered = filtered.masked_fill(hit & rows[:, None], float("-inf"))
    # Inverse-CDF sampling with one uniform per row from the row's own (CPU) generator: the
    # uniforms cross to the device as one small tensor, the distribution never leaves it. u is in
    # (0, 1], so x = u * total lands on a token with positive probability: the first index whose
    # cumulative mass reaches x.
    cdf = torch.softmax(filtered.double(), dim=-1).cumsum(dim=-1)
    if uniforms is None:
        uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens])
    u = 1.0 - uniforms.to(cdf.device, non_blocking=True)
    x = (u * cdf[:, -1]).unsqueeze(1)
    nxt = torch.searchsorted(cdf, x).squeeze(1).clamp_(max=cdf.shape[1] - 1)
    return nxt, logp.gather(1, nxt[:, None]).squeeze(1)


def _top_k_top_p(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits with the tokens outside top-k / the top-p nucleus set to -inf (>= 1 token kept)."""
    out = scaled
    if top_k is not None and top_k > 0 and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def length_cap(call_seed: int, request: int, sample: int, max_new: int) -> int:
    """The `length_tail` workload's length limit of one rollout: 80% stop within max_new / 8
    tokens, 15% within max_new / 2, 5% run to max_new (a heavy tail, as reasoning RL sees)."""
    rng = random.Random(f"length:{call_seed}:{request}:{sample}")
    u = rng.random()
    if u < 0.80:
        return max(1, int(max_new * rng.uniform(1 / 32, 1 / 8)))
    if u < 0.95:
        return max(1, int(max_new * rng.uniform(1 / 8, 1 / 2)))
    return max_new


def _row_generator(call_seed: int, request: int, sample: int) -> torch.Generator:
    seed = random.Random(f"{call_seed}:{request}:{sample}").getrandbits(62)
    return torch.Generator().manual_seed(seed)


def _validate_sampling(sp: SamplingParams) -> None:
    problems = []
    if sp.n < 1:
        problems.append(f"n={sp.n} must be >= 1")
    if sp.temperature < 0:
        problems.append(f"temperature={sp.temperature} must be >= 0 (0 = greedy)")
    if not 0.0 < sp.top_p <= 1.0:
        problems.append(f"top_p={sp.top_p} must be in (0, 1]")
    if sp.top_k == 0 or sp.top_k < -1:
        problems.append(f"top_k={sp.top_k} must be -1 (off) or >= 1")
    if sp.max_new_tokens < 0:
        problems.append(f"max_new_tokens={sp.max_new_tokens} must be >= 0")
    if problems:
        raise ValueError("LocalEngine.generate: bad SamplingParams: " + "; ".join(problems))


def _tied_groups(model: torch.nn.Module, state: dict[str, Any]) -> dict[str, set[str]]:
    """State-dict names that share storage (tied embeddings), name -> the other names."""
    by_ptr: dict[int, list[str]] = {}
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.numel():
            by_ptr.setdefault(t.data_ptr(), []).append(name)
    groups: dict[str, set[str]] = {}
    for names in by_ptr.values():
        if len(names) > 1:
            for n in names:
                groups[n] = set(names) - {n}
    return groups
