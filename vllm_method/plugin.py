"""The `vllm.general_plugins` entry point: vLLM calls `register` in every process it starts."""

from __future__ import annotations


def register() -> None:
    """Register the `lape_awq` quantization config and our model classes (idempotent)."""
    from vllm import ModelRegistry

    from lape_awq.vllm_method import config  # noqa: F401  (the decorator registers on import)

    # vLLM architecture -> our class (vllm_method/models.py), as "module:class": vLLM imports it only when
    # such a model loads, so the plugin costs nothing to processes that serve other models.
    for architecture, path in MODEL_CLASSES.items():
        ModelRegistry.register_model(architecture, path)


MODEL_CLASSES = {"Gemma2ForCausalLM": "lape_awq.vllm_method.models:LapeGemma2ForCausalLM"}
