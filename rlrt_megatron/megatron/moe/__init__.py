"""Mixture-of-experts (Qwen3-MoE) on megatron-core: the provider's MoE settings and layer specs
(`provider.py`), and what the trainer does with the routers: routing replay and load metrics
(`routing.py`)."""
