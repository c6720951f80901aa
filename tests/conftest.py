"""Shared fixtures: the embedded default model (prepared once per session) and tiny random models."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

ARCHITECTURES = ("llama", "qwen2", "gemma3")
# Every family of quant/architectures.py, for the tests of the table itself.
ALL_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")

# Without a GPU the Triton kernels run in Triton's CPU interpreter; it is chosen when a kernel is defined,
# so before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The converted Gemma 3 270M; the first session on a fresh $LAPE_AWQ_HOME runs the real conversion."""
    from lape_awq.quant.default_model import prepare_default_model

    return prepare_default_model()


@pytest.fixture(scope="session")
def tokenizer(default_model_dir: Path):
    """A real tokenizer (Gemma 3's, 262k vocabulary, Hangul-aware) for the tiny models."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


# vLLM's CPU attention runs head sizes from 32 up: the tiny models it serves use this attention shape.
VLLM_ATTENTION = {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}


def tiny_config(arch: str, vocab_size: int, **overrides):
    """A 2-layer, 128-neuron config of a real architecture; token ids as in Gemma's tokenizer."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    common.update(overrides)
    plain = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
    if arch in plain:
        return plain[arch](**common)
    if arch == "gemma2":
        return Gemma2Config(**common, sliding_window=64, query_pre_attn_scalar=16)
    if arch == "gemma3":
        return Gemma3TextConfig(**common, sliding_window=64, query_pre_attn_scalar=16)
    raise ValueError(arch)


def build_tiny_model(arch: str, vocab_size: int, seed: int = 0, **overrides) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size, **overrides), dtype=torch.float32)
    return model.eval()


@pytest.fixture
def tiny_model_dir(tmp_path: Path, tokenizer) -> Callable[..., Path]:
    """Factory: save a tiny random model of `arch` (optionally edited first) with the real tokenizer."""

    def make(arch: str, edit: Callable[[nn.Module], None] | None = None) -> Path:
        model = build_tiny_model(arch, len(tokenizer))
        if edit is not None:
            edit(model)
        path = tmp_path / f"tiny-{arch}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path

    return make
