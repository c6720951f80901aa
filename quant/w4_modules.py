"""The torch reference for running a checkpoint: an nn.Linear replacement holding the packed W4 tensors
and the sparse FP16 part, exactly as stored. The numerical reference for kernels and the vLLM method."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lape_awq.kernels.awq_packing import dequantize, pack_int4
from lape_awq.quant.quantizer import QuantizedLinear

SparseKind = Literal["rows", "cols"]


def sparse_kind(proj: str) -> SparseKind:
    """gate/up keep output rows; down keeps input columns."""
    return "cols" if proj.endswith("down_proj") else "rows"


class W4Linear(nn.Module):
    """y = x @ dequant(qweight, qzeros, scales) (+ bias) + sparse term, in x's dtype."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        bias: bool,
        num_sparse: int = 0,
        sparse_kind: SparseKind | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.sparse_kind = sparse_kind
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(in_features, out_features // 8, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // 8, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)
        self.register_buffer("sparse_idx", torch.zeros(num_sparse, dtype=torch.int32) if num_sparse else None)
        width = in_features if sparse_kind == "rows" else out_features
        self.register_buffer(
            "sparse", torch.zeros(num_sparse, width, dtype=torch.float16) if num_sparse else None
        )
        self._dense: torch.Tensor | None = None

    @classmethod
    def from_quantized(cls, q: QuantizedLinear, kind: SparseKind | None) -> W4Linear:
        codes = q.quant.codes
        k = 0 if q.sparse_idx is None else q.sparse_idx.numel()
        m = cls(
            codes.shape[1], codes.shape[0], q.quant.group_size, q.bias is not None, k, kind if k else None
        )
        m.qweight.copy_(pack_int4(codes.T))
        m.qzeros.copy_(pack_int4(q.quant.zeros.T))
        m.scales.copy_(q.quant.scales.T.half())
        if q.bias is not None:
            m.bias.copy_(q.bias.half())
        if k:
            m.sparse_idx.copy_(q.sparse_idx.int())
            m.sparse.copy_(q.sparse)
        return m

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The effective weight [in, out]: dequantized W4 plus the sparse part (cached per dtype)."""
        if self._dense is None or self._dense.dtype != dtype:
            w = dequantize(self.qweight, self.qzeros, self.scales.to(dtype), self.group_size)
            if self.sparse is not None:
                idx = self.sparse_idx.long()
                if self.sparse_kind == "rows":
                    w[:, idx] += self.sparse.to(dtype).T
                else:
                    w[idx, :] += self.sparse.to(dtype)
            self._dense = w
        return self._dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.dense_weight(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def install_quantized(model: nn.Module, quantized: dict[str, QuantizedLinear]) -> None:
    """Replace each named nn.Linear of `model` by its W4Linear."""
    for name, q in quantized.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, W4Linear.from_quantized(q, sparse_kind(child)))
