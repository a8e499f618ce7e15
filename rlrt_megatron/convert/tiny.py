"""A tiny random Qwen3 / Llama 3 Hugging Face checkpoint with its own tokenizer, built offline.

Used by the tests, the CPU demo and the conversion checks. Everything is deterministic given the
seed: the byte-level BPE tokenizer is trained with `tokenizers` on the project's synthetic
arithmetic text (digits split into single tokens so numbers tokenize uniformly), the weights come
from a seeded generator. Norm weights are randomised too (not all ones), so a conversion that
swaps two norms or forgets one is caught by the parity and round-trip checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Qwen-style chat template (ChatML), trimmed to what the project uses: roles and contents.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3-MoE: 8 experts, top-2 (renormalised, as Qwen3-30B-A3B), MoE in every layer.
TINY_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
# Router weights this large make top-2 choices clear-cut (no near ties), so fp32 reordering
# between implementations cannot flip an expert choice (parity checks rely on it).
ROUTER_STD = 0.5

TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)


def _tokenizer_corpus(n: int, seed: int):
    from rlrt_megatron.data.synthetic import synthetic_corpus

    for i, text in enumerate(synthetic_corpus(n, seed)):
        problem, _, solution = text.partition("\n")
        yield text
        if i % 4 == 0:  # chat-formatted copies so role names become tokens too
            yield (
                f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                f"<|im_start|>user\n{problem} Put the final answer in \\boxed{{}}.<|im_end|>\n"
                f"<|im_start|>assistant\n{solution}<|im_end|>\n"
                "Correct solution:\n\nCorrectly solve the original question.\n"
            )


def build_tokenizer(vocab_size: int = 512, seed: int = 0, n_texts: int = 4000):
    """Train a byte-level BPE tokenizer (<= `vocab_size` tokens) on the synthetic math corpus.

    Returns a `transformers.PreTrainedTokenizerFast` with the ChatML special tokens, eos
    `<|im_end|>`, pad `<|endoftext|>` and the chat template set.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(
            f"tiny tokenizer: vocab_size={vocab_size} is too small; a byte-level BPE needs "
            "at least "
            f"{256 + len(SPECIAL_TOKENS) + 1} (256 bytes + special tokens + 1 merge)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(n_texts, seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def tiny_config(
    arch: str = "qwen3",
    *,
    vocab_size: int = 512,
    tied: bool = True,
    tokenizer=None,
    num_layers: int = 2,
    overrides: dict | None = None,
):
    """The tiny model's `transformers` config (Qwen3, Qwen3-MoE or Llama 3 with llama3 rope
    scaling); `overrides` sets more HF config fields (e.g. Qwen3-MoE's `mlp_only_layers=[0]`
    or `decoder_sparse_step=2` for dense layers between the MoE ones)."""
    from transformers import LlamaConfig, Qwen3Config, Qwen3MoeConfig

    ids = {}
    if tokenizer is not None:
        ids = dict(
            bos_token_id=None,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        )
    common = dict(
        vocab_size=vocab_size,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        attention_bias=False,
        **{**TINY_SHAPE, "num_hidden_layers": num_layers},
        **ids,
        **(overrides or {}),
    )
    if arch == "qwen3":
        return Qwen3Config(
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            architectures=["Qwen3ForCausalLM"],
            **common,
        )
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            architectures=["Qwen3MoeForCausalLM"],
            **TINY_MOE,
            **common,
        )
    if arch == "llama":
        return LlamaConfig(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500_000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                # Llama 3.x's value (megatron-core fixes it); with head_dim 16 and this theta the
                # lowest frequencies are still divided by `factor`, so the scaling is exercised.
                "original_max_position_embeddings": 8192,
            },
            mlp_bias=False,
            architectures=["LlamaForCausalLM"],
            **{**common, "max_position_embeddings": 16384},  # > the original 8192 (HF checks)
        )
    raise ValueError(f"tiny model: unknown arch {arch!r}; choose 'qwen3', 'qwen3_moe' or 'llama'")


@torch.no_grad()
def randomize_weights(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Seeded weights: N(0, std) matrices, norm weights 1 + N(0, 0.1) (never all ones), MoE
    routers N(0, ROUTER_STD)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if p.dim() == 1:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        else:
            scale = ROUTER_STD if name.endswith("mlp.gate.weight") else std
            p.copy_(scale * torch.randn(p.shape, generator=gen))


def make_tiny_model(
    out_dir: str | Path,
    *,
    arch: str = "qwen3",
    tied: bool = True,
    vocab_size: int = 512,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    num_layers: int = 2,
    overrides: dict | None = None,
) -> Path:
    """Write a tiny random HF checkpoint (config, safetensors, tokenizer, template) to `out_dir`.

    Loads offline with `AutoTokenizer.from_pretrained(out_dir)` and
    `AutoModelForCausalLM.from_pretrained(out_dir)`. `vocab_size` is the model's (embedding rows);
    the tokenizer has at most that many tokens, like real checkpoints (Qwen3 pads to 151936).
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(min(vocab_size, 512), seed=seed)
    config = tiny_config(
        arch, vocab_size=vocab_size, tied=tied, tokenizer=tokenizer, num_layers=num_layers,
        overrides=overrides,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_weights(model, seed)
    model = model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    GenerationConfig(
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=True,
        temperature=1.0,
    ).save_pretrained(out)
    (out / "rlrt_tiny.json").write_text(
        json.dumps(
            {
                "arch": arch,
                "num_layers": num_layers,
                "tied": tied,
                "vocab_size": vocab_size,
                "seed": seed,
                "dtype": str(dtype),
                **({"overrides": overrides} if overrides else {}),
            },
            indent=1,
        )
    )
    return out
