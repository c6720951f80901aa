"""Model classes registered through the plugin (vLLM's out-of-tree ModelRegistry), for the architectures whose
vLLM class builds its embedding without the quantization config, so a quantized vocabulary has nowhere to
load. vLLM 0.32's Llama, Qwen2, Qwen3 and Gemma 3 pass it (no class needed); Gemma 2 does not.

Each class is vLLM's own with the embedding rebuilt from our config only when that config quantizes the
vocabulary: for every other checkpoint (float, stock AWQ, lape_awq without a vocabulary) it is vLLM's class
unchanged."""

from __future__ import annotations

from vllm.config import VllmConfig
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.models.gemma2 import Gemma2ForCausalLM
from vllm.model_executor.models.utils import maybe_prefix

from lape_awq.vllm_method.config import LapeAwqConfig


class LapeGemma2ForCausalLM(Gemma2ForCausalLM):
    """vLLM's Gemma 2; with a lape_awq quantized vocabulary its (tied) embedding is ours."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        quant_config = vllm_config.quant_config
        if isinstance(quant_config, LapeAwqConfig) and quant_config.vocab:
            config = vllm_config.model_config.hf_config
            self.model.embed_tokens = VocabParallelEmbedding(
                config.vocab_size,
                config.hidden_size,
                quant_config=quant_config,
                prefix=maybe_prefix(maybe_prefix(prefix, "model"), "embed_tokens"),
            )
