"""Asymmetric group quantization of weights ([out, in], groups along `in`; 4 bits for the decoder linears,
4 or 8 for the vocabulary), with kept (FP16) rows or columns that the quantizer must reproduce exactly and
leave out of group statistics; and the in-memory forms the quantizer hands the checkpoint: `QuantizedLinear`
for one decoder linear, `QuantizedVocab` for the embedding / LM head."""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = 4  # the decoder linears' codes (AutoAWQ gemm)


@dataclass(frozen=True)
class GroupQuant:
    """codes int32 [out, in] (0..15), zeros int32 [out, in/g], scales float32 [out, in/g] (fp16-exact)."""

    codes: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    group_size: int

    def dequantize(self) -> torch.Tensor:
        g = self.group_size
        zeros = self.zeros.repeat_interleave(g, dim=1)
        return (self.codes - zeros).to(self.scales.dtype) * self.scales.repeat_interleave(g, dim=1)


@dataclass
class QuantizedVocab:
    """The quantized vocabulary matrix [V, H] (the tied embedding / LM head, or one of them when untied):
    `bits`-bit codes in groups along H, and the kept rows' FP16 residuals [k, H] (dense + residual == the
    float rows) with their sorted token ids."""

    quant: GroupQuant
    bits: int
    sparse_idx: torch.Tensor | None = None
    sparse: torch.Tensor | None = None


@dataclass
class QuantizedLinear:
    """One linear's 4-bit form. `sparse` is [k, in] (kept rows: gate/up) or [k, out] (kept columns: down),
    the FP16 residual that makes the kept neurons' weights exact; `sparse_idx` their sorted indices."""

    quant: GroupQuant
    bias: torch.Tensor | None
    sparse_idx: torch.Tensor | None = None
    sparse: torch.Tensor | None = None


def quantize_groups(
    w: torch.Tensor, group_size: int, skip_cols: torch.Tensor | None = None, bits: int = BITS
) -> GroupQuant:
    """AWQ's min/max quantizer with codes 0 .. 2**bits - 1. Columns in `skip_cols` (bool [in]) do not enter
    their group's min/max (their codes are whatever the clamp gives; the sparse FP16 part corrects them).
    Scales are rounded to fp16 before the codes are computed: the checkpoint dequantizes to exactly this."""
    out_features, in_features = w.shape
    if in_features % group_size:
        raise ValueError(f"in_features {in_features} is not a multiple of group size {group_size}")
    w = w.float()
    grouped = w.reshape(out_features, -1, group_size)
    skip = None if skip_cols is None else skip_cols.reshape(1, -1, group_size)
    scales, zeros = group_params(grouped, skip, bits)
    codes = round_to_codes(grouped, scales.unsqueeze(-1), zeros.unsqueeze(-1), bits)
    return GroupQuant(codes.reshape(w.shape).int(), zeros.int(), scales, group_size)


def group_params(
    grouped: torch.Tensor, skip: torch.Tensor | None = None, bits: int = BITS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales (fp16-exact float32) and zero points (float, integral) of float32 weights grouped as
    [out, groups, g] from each group's min/max, leaving out the columns `skip` (bool, broadcast to
    `grouped`) marks. `quantize_groups`' formula, shared with GPTQ (quant/awq/gptq.py)."""
    return _range_params(*_group_range(grouped, skip), bits)


def _group_range(grouped: torch.Tensor, skip: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's min (<= 0) and max (>= 0, so zero stays representable) over its columns not skipped."""
    if skip is None:
        wmax, wmin = grouped.amax(dim=-1), grouped.amin(dim=-1)
    else:
        wmax = grouped.masked_fill(skip, -torch.inf).amax(dim=-1)
        wmin = grouped.masked_fill(skip, torch.inf).amin(dim=-1)
        empty = torch.isinf(wmax)  # a group whose every column is kept
        wmax, wmin = wmax.masked_fill(empty, 0.0), wmin.masked_fill(empty, 0.0)
    return wmin.clamp_max(0.0), wmax.clamp_min(0.0)


def _range_params(wmin: torch.Tensor, wmax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    max_code = 2**bits - 1
    scales = ((wmax - wmin).clamp_min(1e-5) / max_code).half().float()
    zeros = (-torch.round(wmin / scales)).clamp(0, max_code)
    return scales, zeros


def search_group_params(
    grouped: torch.Tensor,
    importance: torch.Tensor,
    skip: torch.Tensor | None = None,
    bits: int = BITS,
    n_grid: int = 40,
    max_shrink: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`group_params`' scales and zeros for the group range shrunk by the factor (1, 1 - 1/n_grid, ...,
    down to 1 - max_shrink) that gives each [out, group] the least importance-weighted squared rounding
    error sum_k importance_k (w_k - q(w_k))^2, weights beyond the range clamped (reference GPTQ's "mse"
    grid). `importance` (broadcast to `grouped`, [out, groups, g]) weighs each column; columns `skip`
    marks count for nothing. Factor 1 is the min/max grid, so no group does worse than it."""
    max_code = 2**bits - 1
    importance = importance.to(grouped.dtype)
    if skip is not None:
        importance = torch.where(skip, 0.0, importance)
    # The range of the shrunk weights is the shrunk range (a positive factor keeps the order, even rounded).
    wmin, wmax = _group_range(grouped, skip)
    error = torch.empty_like(grouped)  # one buffer, every step in place: this runs per linear, many steps
    best_scales = best_zeros = best_err = None
    for step in range(round(max_shrink * n_grid) + 1):
        factor = 1 - step / n_grid
        scales, zeros = _range_params(wmin * factor, wmax * factor, bits)
        s, z = scales.unsqueeze(-1), zeros.unsqueeze(-1)
        torch.div(grouped, s, out=error)  # round_to_codes, dequantized, minus the weights: the error
        error.round_().add_(z).clamp_(0, max_code).sub_(z).mul_(s).sub_(grouped)
        err = error.square_().mul_(importance).sum(-1)
        if best_err is None:
            best_scales, best_zeros, best_err = scales, zeros, err
            continue
        better = err < best_err
        best_scales = torch.where(better, scales, best_scales)
        best_zeros = torch.where(better, zeros, best_zeros)
        best_err = torch.where(better, err, best_err)
    return best_scales, best_zeros


def round_to_codes(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int = BITS
) -> torch.Tensor:
    """Round-to-nearest codes (float, 0 .. 2**bits - 1) of `w` on the grid (scales, zeros) broadcast to it."""
    return (torch.round(w / scales) + zeros).clamp(0, 2**bits - 1)


def fake_quantize(
    w: torch.Tensor,
    group_size: int,
    keep_rows: torch.Tensor | None = None,
    keep_cols: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize `w`, with kept rows / columns (int64 indices) restored exactly."""
    skip = None
    if keep_cols is not None and keep_cols.numel():
        skip = torch.zeros(w.shape[1], dtype=torch.bool, device=w.device)
        skip[keep_cols] = True
    out = quantize_groups(w, group_size, skip).dequantize().to(w.dtype)
    if keep_rows is not None and keep_rows.numel():
        out[keep_rows] = w[keep_rows]
    if skip is not None:
        out[:, skip] = w[:, skip]
    return out
