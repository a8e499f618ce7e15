"""HF <-> Megatron-Core conversion, driven by one declarative table (`mapping.RULES`).

- `hf_to_megatron.hf_to_megatron(hf_dir, out_dir, dtype=, spec=)`: HF safetensors -> a
  dist checkpoint that loads at any TP x PP (`rlrt convert hf-to-megatron`).
- `megatron_to_hf.megatron_to_hf(ckpt_dir, out_dir, dtype=)`: back to HF safetensors + config +
  tokenizer, bit-exact (`rlrt convert megatron-to-hf`).
- `load.load_checkpoint_into_model(chunks, ckpt_dir)` / `load.model_sharded_state_dict(chunks)` /
  `load.iter_hf_weights(chunks)`: live models (any layout) <-> checkpoints / rollout engines.
- `tiny.make_tiny_model(out_dir, ...)`: the tiny random Qwen3 / Llama model with its tokenizer.
- `parity.run_parity(hf_dir, ckpt_dir, tp, pp)`: max |logit diff| vs transformers.

Submodules are imported explicitly; megatron is imported inside functions, so `mapping`, `io`
and `tiny` stay usable without it.
"""
