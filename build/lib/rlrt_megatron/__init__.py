"""rlrt-megatron: RLRT (RLVR with Reversed Teacher) and its baselines on Megatron-Core."""

__version__ = "0.1.0"
