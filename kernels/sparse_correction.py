"""The sparse FP16 part of a W4 linear, in the form the kernels read: a slot map plus the kept values.

A kept output channel (gate/up, "rows") or kept input channel (down, "cols") j has slot s = slots[j] >= 0
and its FP16 residual in values[s]; every other channel has slot -1. The kernels add values[s] to the
dequantized weight in registers, so the kept weights are exact without a second pass over x.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

# "rows": kept output channels (gate/up); "cols": kept input channels (down).
SparseKind = Literal["rows", "cols"]
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class SparseCorrection:
    """kind "rows": slots int32 [out], values [k, in]; kind "cols": slots int32 [in], values [k, out]."""

    kind: SparseKind
    slots: torch.Tensor
    values: torch.Tensor

    @property
    def num_kept(self) -> int:
        return self.values.shape[0]

    def check_shapes(self, in_features: int, out_features: int) -> None:
        """ValueError unless this correction fits a linear of these sizes."""
        slots_len, width = (out_features, in_features) if self.kind == "rows" else (in_features, out_features)
        if self.slots.shape != (slots_len,) or self.slots.dtype != torch.int32:
            raise ValueError(
                f"sparse {self.kind}: slots must be int32 [{slots_len}], got "
                f"{self.slots.dtype} {list(self.slots.shape)}"
            )
        if self.values.dim() != 2 or self.values.shape[1] != width:
            raise ValueError(
                f"sparse {self.kind}: values must be [k, {width}], got {list(self.values.shape)}"
            )


def check_sparse_indices(idx: torch.Tensor, size: int, what: str) -> torch.Tensor:
    """`idx` as int64 if it is a 1-D integer tensor, sorted, without duplicates, within [0, size); else a
    ValueError starting with `what`. The one check of kept-channel indices (kernels, checkpoint, vLLM)."""
    if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"{what}: indices must be a 1-D integer tensor, got {idx.dtype} {list(idx.shape)}")
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= size:
            raise ValueError(f"{what}: index out of range [0, {size}): min {lo}, max {hi}")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError(f"{what}: indices must be sorted and free of duplicates")
    return idx.long()


def _build(kind: SparseKind, idx: torch.Tensor, values: torch.Tensor, size: int) -> SparseCorrection:
    what = f"sparse {kind}"
    index = check_sparse_indices(idx, size, what)
    if values.dim() != 2 or values.shape[0] != index.numel():
        raise ValueError(f"{what}: values must be [{index.numel()}, width], got {list(values.shape)}")
    if values.dtype not in _FLOATS:
        raise ValueError(f"{what}: values must be fp16, bf16 or fp32, got {values.dtype}")
    return SparseCorrection(kind, slot_map(index.to(values.device), size), values.contiguous())


def slot_map(idx: torch.Tensor, size: int) -> torch.Tensor:
    """int32 [size]: i where channel idx[i] is kept, -1 elsewhere (on idx's device)."""
    slots = torch.full((size,), -1, dtype=torch.int32, device=idx.device)
    slots[idx.long()] = torch.arange(idx.numel(), dtype=torch.int32, device=idx.device)
    return slots


def sparse_rows(idx: torch.Tensor, rows: torch.Tensor, out_features: int) -> SparseCorrection:
    """Output channels `idx` (sorted, unique) get `x @ rows.T` added; rows [k, in]."""
    return _build("rows", idx, rows, out_features)


def sparse_cols(idx: torch.Tensor, cols: torch.Tensor, in_features: int) -> SparseCorrection:
    """`x[:, idx] @ cols` is added; cols [k, out] (one row per kept input channel)."""
    return _build("cols", idx, cols, in_features)


def merged_rows(parts: list[tuple[torch.Tensor, torch.Tensor, int]]) -> SparseCorrection:
    """One "rows" correction for a weight made of stacked outputs (vLLM's gate_up_proj, qkv_proj).

    parts: (idx, rows, out_features) per stacked weight, in stacking order; each part's indices are local
    to it and may be empty.
    """
    offset, all_idx, all_rows = 0, [], []
    for idx, rows, size in parts:
        all_idx.append(check_sparse_indices(idx, size, "sparse rows") + offset)
        all_rows.append(rows)
        offset += size
    return sparse_rows(torch.cat(all_idx), torch.cat(all_rows), offset)
