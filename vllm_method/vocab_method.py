"""The `lape_awq` quantized vocabulary in vLLM: the embedding (and, tied or as its own matrix, the LM head)
as 4/8-bit codes plus kept FP16 rows (layout: kernels/vocab_codes.py).

Loading: qweight/qzeros/scales are sharded along the vocabulary by VocabParallelEmbedding's own loader (the
`output_dim` attribute); the kept rows are loaded whole on every rank and cut to the rows the rank owns after
loading. A tied LM head is the embedding module itself, so its tensors exist once and are processed once.

Running: on CPU the compiled kernel (kernels/cpu_codes.cpp) reads the codes directly, for the lookup and for
the logits, in fp32; where it cannot be built, the same formulas in torch. On CUDA (`CudaVocab`; not yet run
on a GPU, its math tested in Triton's interpreter) the lookup dequantizes the gathered rows; the 4-bit LM
head runs in the Triton W4 kernel with fp32 activations (the codes transposed to its layout at load, the
kept rows as its rows correction) and the 8-bit one as a dequantized fp16 weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
from vllm.model_executor.utils import set_weight_attrs

from lape_awq.kernels.sparse_correction import SparseCorrection, check_sparse_indices, slot_map, sparse_rows
from lape_awq.kernels.vocab_codes import dense_vocab, kept_dequantized_rows, packed_width, to_awq_gemm
from lape_awq.vllm_method.config import CheckpointError, LapeAwqConfig
from lape_awq.vllm_method.cpu_holders import hold, warn_if_no_cpu_kernel
from lape_awq.vllm_method.sparse_shards import in_range, load_whole


@dataclass
class CudaVocab:
    """A vocabulary shard in its CUDA forms: the codes for the lookup, and for the logits either the W4
    kernel's layout with its rows correction (4 bits) or a dequantized fp16 weight (8 bits)."""

    codes: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # qweight, qzeros, scales as stored
    bits: int
    group_size: int
    kept_idx: torch.Tensor | None  # local row indices (sorted) and their residuals
    kept_rows: torch.Tensor | None
    slots: torch.Tensor | None = None  # the lookup's slot map of the kept rows
    w4: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    correction: SparseCorrection | None = None
    dense: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        bits: int,
        group_size: int,
        kept_idx: torch.Tensor | None,
        kept_rows: torch.Tensor | None,
    ) -> CudaVocab:
        vocab = cls((qweight, qzeros, scales), bits, group_size, kept_idx, kept_rows)
        if kept_idx is not None and kept_idx.numel():
            vocab.slots = slot_map(kept_idx, qweight.shape[0])
        if bits == 4:
            vocab.w4 = to_awq_gemm(qweight, qzeros, scales)
            if kept_idx is not None and kept_idx.numel():
                vocab.correction = sparse_rows(kept_idx, kept_rows.half(), qweight.shape[0])
        else:
            vocab.dense = dense_vocab(qweight, qzeros, scales.float(), bits, kept_idx, kept_rows).half()
        return vocab

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 rows [*ids.shape, H]: the gathered rows dequantized, plus the kept rows' residuals."""
        qweight, qzeros, scales = self.codes
        flat = ids.reshape(-1).long()
        rows = kept_dequantized_rows(
            qweight, qzeros, scales.float(), self.bits, flat, self.slots, self.kept_rows
        )
        return rows.view(*ids.shape, -1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits [..., V]."""
        if self.dense is not None:
            return torch.nn.functional.linear(x.half(), self.dense).float()
        from lape_awq.kernels.w4_gemm import w4_linear

        flat = x.reshape(-1, x.shape[-1]).float().contiguous()
        out = w4_linear(flat, *self.w4, self.group_size, None, self.correction)
        return out.view(*x.shape[:-1], -1)


class LapeAwqVocabMethod(QuantizeMethodBase):
    """One per vocabulary matrix (VocabParallelEmbedding, ParallelLMHead)."""

    def __init__(self, config: LapeAwqConfig, prefix: str):
        vocab = config.vocab
        self.prefix = prefix
        self.bits: int = vocab["bits"]
        self.group_size: int = vocab["group_size"]
        self.kept: int = vocab.get("kept_rows", 0)

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        rows, hidden = sum(output_partition_sizes), input_size_per_partition
        if hidden % self.group_size:
            raise CheckpointError(f"{self.prefix}: hidden size {hidden} is no multiple of {self.group_size}")
        shapes = {
            "qweight": ((rows, packed_width(hidden, self.bits)), torch.uint8),
            "qzeros": ((rows, hidden // self.group_size), torch.uint8),
            "scales": ((rows, hidden // self.group_size), torch.float16),
        }
        loader = extra_weight_attrs["weight_loader"]
        for name, (shape, dtype) in shapes.items():  # sharded along the vocabulary by the layer's loader
            param = torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
            set_weight_attrs(param, {"output_dim": 0, "weight_loader": loader})
            layer.register_parameter(name, param)
        if self.kept:
            kept = {
                "sparse_idx": torch.zeros(self.kept, dtype=torch.int32),
                "sparse_rows": torch.zeros(self.kept, hidden, dtype=torch.float16),
            }
            for name, tensor in kept.items():
                param = torch.nn.Parameter(tensor, requires_grad=False)
                set_weight_attrs(param, {"weight_loader": load_whole})
                layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        local_idx, local_rows = None, None
        if self.kept:
            idx = layer.sparse_idx.data
            try:
                check_sparse_indices(idx, layer.org_vocab_size, f"{self.prefix}.sparse_idx")
            except ValueError as exc:
                raise CheckpointError(str(exc)) from None
            shard = layer.shard_indices  # this rank's rows of the vocabulary
            local_idx, local_rows = in_range(
                idx, layer.sparse_rows.data, shard.org_vocab_start_index, shard.org_vocab_end_index
            )
            del layer.sparse_idx, layer.sparse_rows
        qweight, qzeros, scales = layer.qweight.data, layer.qzeros.data, layer.scales.data
        del layer.qweight, layer.qzeros, layer.scales
        if qweight.device.type == "cpu":
            from lape_awq.kernels.cpu_codes import CodeMatrix

            warn_if_no_cpu_kernel()
            layer.lape_codes = hold(
                layer, CodeMatrix.build(qweight, qzeros, scales, self.bits, local_idx, local_rows)
            )
            return
        layer.lape_cuda = CudaVocab.build(
            qweight, qzeros, scales, self.bits, self.group_size, local_idx, local_rows
        )

    def embedding(self, layer: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
        if hasattr(layer, "lape_codes"):
            from lape_awq.vllm_method.cpu_codes_ops import code_rows

            return code_rows(input_, layer.lape_codes).to(layer.params_dtype)
        return layer.lape_cuda.embedding(input_).to(layer.params_dtype)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The logits in fp32 (the LM head)."""
        if hasattr(layer, "lape_codes"):
            from lape_awq.kernels.cpu_codes import code_matmul

            logits = code_matmul(x, layer.lape_codes)
        else:
            logits = layer.lape_cuda.logits(x)
        return logits if bias is None else logits + bias.float()

    def tie_weights(self, layer: torch.nn.Module, embed_tokens: torch.nn.Module) -> torch.nn.Module:
        """A tied LM head is the embedding module: one set of codes, loaded and processed once."""
        del layer
        return embed_tokens
