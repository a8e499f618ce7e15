"""A minimal transformers sampling engine (temporary adapter until `rollout/local.py` lands).

Implements `rollout.base.RolloutEngine` with `model.generate` on CPU: left-padded batches, `n`
samples per prompt, behavior log-probs from the processed (temperature / top-p) scores, seeded
per call without touching the caller's RNG. The trainer prefers `rollout.local.LocalEngine`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from rlrt_megatron.rollout.base import Completion, GenerateRequest, SamplingParams


class HFSamplingEngine:
    """Sample with a transformers causal LM held in this process."""

    def __init__(self, hf_dir: str, dtype: torch.dtype = torch.float32, batch_size: int = 64):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
        self.batch_size = batch_size
        self._version = 0
        self.eos_id = self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.eos_id if isinstance(self.eos_id, int) else self.eos_id[0]

    @property
    def weight_version(self) -> int:
        return self._version

    @torch.no_grad()
    def generate(
        self, requests: list[GenerateRequest], sampling: SamplingParams
    ) -> list[list[Completion]]:
        out: list[list[Completion]] = []
        with torch.random.fork_rng(devices=[]):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            per_call = max(1, self.batch_size // max(sampling.n, 1))
            for i in range(0, len(requests), per_call):
                out.extend(self._generate(requests[i : i + per_call], sampling))
        return out

    def _generate(
        self, requests: list[GenerateRequest], sampling: SamplingParams
    ) -> list[list[Completion]]:
        width = max(len(r.prompt_token_ids) for r in requests)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for j, r in enumerate(requests):
            p = torch.tensor(r.prompt_token_ids, dtype=torch.long)
            ids[j, width - len(p) :] = p
            attn[j, width - len(p) :] = 1
        gen = self.model.generate(
            input_ids=ids,
            attention_mask=attn,
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else 0,
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=sampling.n,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
        new = gen.sequences[:, width:]
        scores = torch.stack(gen.scores, dim=1).float().log_softmax(-1)  # [N, T, V]
        lps = torch.gather(scores, 2, new[..., None]).squeeze(-1)
        eos = {self.eos_id} if isinstance(self.eos_id, int) else set(self.eos_id)
        result: list[list[Completion]] = []
        for j, r in enumerate(requests):
            group = []
            for k in range(sampling.n):
                row = j * sampling.n + k
                toks = new[row].tolist()
                n, finish = len(toks), "length"
                for t, tok in enumerate(toks):
                    if tok in eos:
                        n, finish = t + 1, "stop"
                        break
                toks = toks[:n]
                group.append(
                    Completion(
                        request_id=r.request_id,
                        prompt_token_ids=list(r.prompt_token_ids),
                        token_ids=toks,
                        text=self.tokenizer.decode(toks, skip_special_tokens=True),
                        logprobs=lps[row, :n].tolist(),
                        finish_reason=finish,
                        weight_version=self._version,
                    )
                )
            result.append(group)
        return result

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int):
        params = dict(self.model.named_parameters())
        for name, t in named_tensors:
            if name not in params:
                raise KeyError(f"update_weights: unknown parameter {name}")
            params[name].copy_(t.to(params[name].dtype))
        self._version = version

    def health(self) -> bool:
        return True

    def shutdown(self) -> None:
        pass
