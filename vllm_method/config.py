"""`lape_awq` as a vLLM QuantizationConfig: what config.json says, validated before any engine starts. It
hands the decoder linears to LapeAwqLinearMethod and, when the vocabulary is quantized, the embedding and
LM head to LapeAwqVocabMethod."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

METHOD = "lape_awq"
GROUP_SIZES = (32, 64, 128)
# vLLM's names for an MLP's linears (gate and up are merged); the checkpoint's projections per name.
_MLP_LINEAR = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.(gate_up_proj|down_proj)$")
_MLP_PROJECTIONS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


class CheckpointError(ValueError):
    """A checkpoint vLLM must not serve; the message names what is wrong."""


@register_quantization_config(METHOD)
class LapeAwqConfig(QuantizationConfig):
    """W4 AutoAWQ-gemm tensors plus, per MLP, the kept neurons' FP16 residuals, and optionally a 4/8-bit
    vocabulary with kept FP16 rows (docs/checkpoint-format.md)."""

    def __init__(
        self,
        group_size: int,
        sparse: dict[str, Any] | None,
        modules_to_not_convert: list[str],
        vocab: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.group_size = group_size
        self.sparse = sparse or {}
        self.modules_to_not_convert = modules_to_not_convert
        self.vocab = vocab or {}

    def __repr__(self) -> str:
        kept = sum(self.sparse.get("neurons_per_layer", []))
        vocab = f", vocab_bits={self.vocab['bits']}" if self.vocab else ""
        return f"LapeAwqConfig(group_size={self.group_size}, kept_neurons={kept}{vocab})"

    def get_name(self) -> str:
        return METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # Triton's bf16 tl.dot; CPU has no capability and skips the check

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # quantization_config lives in config.json

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LapeAwqConfig:
        bits = config.get("bits", config.get("w_bit"))
        group = config.get("group_size", config.get("q_group_size"))
        if bits != 4 or group not in GROUP_SIZES:
            raise CheckpointError(
                f"lape_awq refuses checkpoint: unsupported quantization (bits {bits}, group size {group}; "
                "it runs 4 bits with group size 32, 64 or 128)"
            )
        if config.get("zero_point", True) is not True or str(config.get("version", "gemm")).lower() != "gemm":
            raise CheckpointError(
                "lape_awq refuses checkpoint: it runs AutoAWQ 'gemm' tensors with zero points"
            )
        vocab = config.get("vocab") or None  # absent or empty: the vocabulary is not quantized
        if vocab is not None:
            from lape_awq.quant.checkpoint.layout import check_vocab_section
            from lape_awq.quant.errors import UserError

            try:
                check_vocab_section(vocab)
            except UserError as error:
                raise CheckpointError(f"lape_awq refuses checkpoint: {error}") from error
        return cls(group, config.get("sparse"), list(config.get("modules_to_not_convert") or []), vocab)

    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: dict[str, Any], user_quant: str | None, hf_config=None
    ) -> str | None:
        # A plain AWQ checkpoint runs on our kernels only when asked (zero kept neurons); stock vLLM keeps it
        # otherwise.
        if user_quant == METHOD and str(hf_quant_cfg.get("quant_method", "")).lower() in ("awq", METHOD):
            return METHOD
        return None

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        """Refuse a bad lape_awq checkpoint here, in the frontend, before any worker starts."""
        path = Path(model_name)
        if not (self.sparse or self.vocab) or not (path / "config.json").is_file():
            return  # plain AWQ (stock layout, vLLM checks the shapes) or not a local directory
        from lape_awq.quant.checkpoint.reader import read_checkpoint
        from lape_awq.quant.errors import UserError

        try:
            read_checkpoint(path)
        except UserError as exc:
            raise CheckpointError(f"lape_awq refuses checkpoint {path}: {exc}") from None

    def kept_neurons(self, prefix: str) -> tuple[int, ...] | None:
        """Per checkpoint projection merged into the vLLM linear `prefix`, its kept-neuron count; None for
        linears without a sparse part."""
        match = _MLP_LINEAR.search(prefix)
        if not self.sparse or match is None:
            return None
        layer, name = int(match.group(1)), match.group(2)
        per_layer = self.sparse.get("neurons_per_layer", [])
        if layer >= len(per_layer) or not per_layer[layer]:
            return None
        projections = set(self.sparse.get("projections", ()))
        counts = tuple(per_layer[layer] if p in projections else 0 for p in _MLP_PROJECTIONS[name])
        return counts if any(counts) else None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, VocabParallelEmbedding):  # the embedding, and ParallelLMHead (a subclass)
            if not self.vocab:
                return None  # vLLM's unquantized embedding, as for stock AWQ
            from lape_awq.vllm_method.vocab_method import LapeAwqVocabMethod

            return LapeAwqVocabMethod(self, prefix)
        if not isinstance(layer, LinearBase):
            return None
        if any(module in prefix for module in self.modules_to_not_convert):
            return UnquantizedLinearMethod()
        from lape_awq.vllm_method.linear_method import LapeAwqLinearMethod

        return LapeAwqLinearMethod(self, prefix)
