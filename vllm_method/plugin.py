"""The `vllm.general_plugins` entry point: vLLM calls `register` in every process it starts."""

from __future__ import annotations


def register() -> None:
    """Register the `lape_awq` quantization config (idempotent: importing twice registers once)."""
    from lape_awq.vllm_method import config  # noqa: F401  (the decorator registers on import)
