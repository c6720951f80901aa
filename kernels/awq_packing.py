"""AutoAWQ "gemm" packing of 4-bit weights, and the W4 + sparse FP16 linear's formula in plain torch
(`w4_sparse_linear`, the oracle the kernel tests evaluate in float64).

Layouts (weights as [in, out], i.e. transposed from nn.Linear):
  qweight int32 [in, out/8]   eight 4-bit codes per int32, nibble i holds output column 8c + AWQ_ORDER[i]
  qzeros  int32 [in/g, out/8] the zero points, packed the same way
  scales  fp16  [in/g, out]
  W[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n]
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Where column j of a pack of eight ends up: nibble AWQ_REVERSE_ORDER[j].
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes [rows, cols] (integers 0..15, cols % 8 == 0) -> int32 [rows, cols/8], nibble i holding
    column 8c + AWQ_ORDER[i]."""
    rows, cols = codes.shape
    if cols % 8:
        raise ValueError(f"cannot pack {cols} columns: not a multiple of 8")
    grouped = codes.to(torch.int32).reshape(rows, cols // 8, 8)[..., list(AWQ_ORDER)]
    return (grouped << _SHIFTS.to(codes.device)).sum(dim=-1, dtype=torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols/8] in AWQ order -> int32 codes [rows, cols] (0..15)."""
    rows, packs = packed.shape
    nibbles = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF
    return nibbles[..., list(AWQ_REVERSE_ORDER)].reshape(rows, packs * 8)


def dequantize(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """The dense weight [in, out] in the dtype of `scales` (float64 in, float64 out)."""
    q = unpack_int4(qweight).to(scales.dtype)
    z = unpack_int4(qzeros).to(scales.dtype).repeat_interleave(group_size, dim=0)
    return (q - z) * scales.repeat_interleave(group_size, dim=0)


def dense_with_kept(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    sparse_idx: torch.Tensor | None = None,
    sparse: torch.Tensor | None = None,
    rows: bool = True,
) -> torch.Tensor:
    """The effective weight [in, out] in the dtype of `scales`: dequantized W4 plus the kept channels'
    residuals (rows: output channels `sparse_idx` get `sparse` [k, in]; else input channels get [k, out])."""
    w = dequantize(qweight, qzeros, scales, group_size)
    if sparse_idx is not None and sparse is not None and sparse_idx.numel():
        idx = sparse_idx.long()
        if rows:
            w[:, idx] += sparse.to(w.dtype).T
        else:
            w[idx, :] += sparse.to(w.dtype)
    return w


def w4_sparse_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    sparse_idx: torch.Tensor | None = None,
    sparse_rows: torch.Tensor | None = None,
    sparse_cols: torch.Tensor | None = None,
) -> torch.Tensor:
    """The formula `y = x @ dequant(W4) (+ bias) + sparse term` in plain torch, computed in x's dtype.

    sparse_rows [k, in]: output channels `sparse_idx` get `x @ rows.T` added (gate/up).
    sparse_cols [k, out]: `x[:, sparse_idx] @ cols` is added (down; one row per kept input neuron).
    """
    w = dequantize(qweight, qzeros, scales.to(x.dtype), group_size)
    y = x @ w
    if sparse_idx is not None and sparse_idx.numel():
        if sparse_rows is not None:
            y[..., sparse_idx] += x @ sparse_rows.to(x.dtype).T
        if sparse_cols is not None:
            y = y + x[..., sparse_idx] @ sparse_cols.to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)
