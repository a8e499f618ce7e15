"""Megatron-Core side of rlrt-megatron: model provider, parallel helpers, log-probs, train step.

Everything under this package may import megatron; nothing outside ``megatron/``, ``convert/``
and ``trainer/`` should. Submodules are imported explicitly (no re-exports here) so that
``import rlrt_megatron.megatron.model`` does not pull in unrelated megatron machinery.
"""
