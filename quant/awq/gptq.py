"""GPTQ (Frantar et al. 2022) in the W4 format: each linear's weights are rounded column by column, every
rounding error spread over the columns not yet rounded through the inverse of the calibration Hessian
H = 2/n sum x x^T of the linear's inputs, so the layer's output on the calibration data moves least.

The codes stay those of `quantize_groups` (asymmetric 4-bit, groups of `group_size` consecutive input
columns): a group's scale and zero point come from its weights as they stand, error updates included,
when the column loop reaches the group, by `quantize_groups`' own formula (`group_params`). With
act-order, columns are rounded in decreasing order of H's diagonal (the inputs that carry the most energy
first, while the most columns are left to take their error) and a group's members are scattered over the
loop, so every grid is fixed up front from the weights as given (reference GPTQ's "static groups"): the
codes keep the format, only the order of rounding changes. With grid search, each grid is the min/max one
shrunk by the factor with the least expected output error (`search_group_params`): still the format.

Kept (FP16) input columns are never rounded. They are moved after every rounded column, so each rounding
error can flow into them too (an FP16 column holds any value: the checkpoint's residual is the kept
column's final value minus its dequantized codes), which is the best they can do for the rounded columns
before them (OBS: after a column is fixed, the later ones hold the least-squares optimum given it).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Literal

import torch

from lape_awq.quant.w4_math import GroupQuant, group_params, round_to_codes, search_group_params

BLOCK_SIZE = 128  # columns per lazy batch update; a multiple of every group size, so groups never straddle
DAMP = 0.01  # dampening: this fraction of the mean diagonal is added to H's diagonal
KeptOrder = Literal["last", "inplace", "first"]


@torch.no_grad()
def input_hessian(
    inputs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor] | None = None
) -> torch.Tensor:
    """H = 2 * sum_t w_t x_t x_t^T / sum_t w_t (float64 [in, in]) over every token of `inputs` (per
    calibration chunk, [sequences, tokens, in]); `weights`, per chunk, weighs each sequence's tokens
    (None: all 1). Each chunk's product runs in float32 and is summed in float64."""
    n = inputs[0].shape[-1]
    total = torch.zeros(n, n, dtype=torch.float64)
    count = 0.0
    for c, x in enumerate(inputs):
        x = x.float()
        if weights is None:
            flat = x.reshape(-1, n)
            total += (flat.T @ flat).double()
            count += flat.shape[0]
        else:
            w = weights[c].float().reshape(-1, *([1] * (x.dim() - 1))).expand(*x.shape[:-1], 1)
            flat, w = x.reshape(-1, n), w.reshape(-1, 1)
            total += (flat.T @ (flat * w)).double()
            count += float(w.double().sum())
    if count <= 0:
        raise ValueError("the calibration tokens' weights sum to zero")
    return total * (2.0 / count)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, in float64; the dampening grows
    tenfold (up to three times) while H + damping is not positive definite."""
    mean_diag = float(h.diagonal().mean())
    for attempt in range(4):
        damped = h.clone()
        damped.diagonal().add_(damp * 10**attempt * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if not info:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if not info:
                return upper
    raise ValueError("the calibration Hessian is not positive definite even after dampening")


@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    keep_cols: torch.Tensor | None = None,
    *,
    block_size: int = BLOCK_SIZE,
    damp: float = DAMP,
    dtype: torch.dtype = torch.float32,
    kept_order: KeptOrder = "last",
    act_order: bool = False,
    grid_search: bool = False,
) -> tuple[GroupQuant, torch.Tensor]:
    """GPTQ-rounded codes of `w` ([out, in]) in `quantize_groups`' format, and the final weights ([out,
    in], `dtype`): the dequantized codes, except the kept columns (`keep_cols`, int64 indices), which are
    never rounded and hold the float values the error updates left them (their codes are whatever their
    group's grid gives, as in `quantize_groups` with skipped columns; the FP16 residual is the difference).

    `kept_order` places the kept columns in the column order: "last" (default: they take every rounded
    column's error), "inplace" (only the errors of the columns before them) or "first" (frozen at their
    float values, no error flows into them). `act_order` rounds the other columns by decreasing H[i, i]
    on grids fixed from `w` (static groups; kept order "last" or "first"). Columns the calibration never
    drives (H's diagonal 0) are rounded to nearest and neither spread nor take error; unlike reference
    GPTQ their weights are kept, not zeroed, since other text may drive them.

    `grid_search` shrinks each group's range to the factor with the least expected output error instead
    of taking its min/max (`search_group_params`): rounding column i by d costs d^2 / U[i, i]^2 of output
    error (U the Cholesky factor of H^-1 below, in the column order), so that weighs its columns."""
    rows, cols = w.shape
    g = group_size
    if cols % g or block_size % g:
        raise ValueError(f"in_features {cols} and block size {block_size} must be multiples of group {g}")
    keep = torch.zeros(cols, dtype=torch.bool)
    if keep_cols is not None and keep_cols.numel():
        keep[keep_cols] = True
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0

    # The column order: rounded columns in their own order (act-order: by decreasing H[i, i]), the kept
    # ones last / first / where they are.
    if act_order and kept_order == "inplace":
        raise ValueError("act-order has no place for kept columns 'inplace'")
    columns = torch.arange(cols)
    rounded_columns = columns[~keep]
    if act_order:
        energy = h.diagonal()[rounded_columns]
        rounded_columns = rounded_columns[torch.argsort(energy, descending=True, stable=True)]
    if kept_order == "last":
        order = torch.cat([rounded_columns, columns[keep]])
    elif kept_order == "first":
        order = torch.cat([columns[keep], rounded_columns])
    else:
        order = columns
    hinv64 = _inverse_cholesky(h[order][:, order], damp)
    hinv = hinv64.to(dtype)
    cost = torch.empty(cols, dtype=torch.float64)  # a column's output error per unit of rounding, squared
    cost[order] = hinv64.diagonal() ** -2

    def grid(
        grouped: torch.Tensor, skip: torch.Tensor, columns: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not grid_search:
            return group_params(grouped, skip)
        return search_group_params(grouped, cost[columns].reshape(1, *grouped.shape[1:]), skip)

    weight = w.to(dtype)[:, order].clone()
    kept_at, group_at = keep[order], order // g

    if act_order:  # static grids: no group "starts" in the loop, so blocks are plain runs of positions
        blocks = [(start, min(start + block_size, cols)) for start in range(0, cols, block_size)]
        segment_end: dict[int, int] = {}
    else:
        # Segments: runs of positions in one group (kept positions of "last" / "first" form their own
        # runs); blocks: whole segments packed up to block_size columns, so a group's columns are in one.
        kept_runs = kept_at.tolist() if kept_order != "inplace" else [False] * cols
        run_of = list(zip(group_at.tolist(), kept_runs, strict=True))
        bounds = [0] + [p for p in range(1, cols) if run_of[p] != run_of[p - 1]] + [cols]
        blocks, first = [], 0
        for start, end in pairwise(bounds):
            if end - first > block_size:
                blocks.append((first, start))
                first = start
        blocks.append((first, cols))
        segment_end = dict(pairwise(bounds))

    # The grids of kept-only groups (and, with act-order, of every group: the static grids, the only ones
    # up front worth searching; the loop below replaces every other group's).
    upfront = w.float().reshape(rows, -1, g), keep.reshape(1, -1, g)
    scales, zeros = grid(*upfront, columns) if act_order else group_params(*upfront)
    static_scales, static_zeros = scales.to(dtype), zeros.to(dtype)
    codes = torch.zeros(rows, cols, dtype=torch.int32)
    final = torch.empty_like(weight)
    kept_list, group_list = kept_at.tolist(), group_at.tolist()
    for i1, i2 in blocks:
        block = weight[:, i1:i2].clone()
        errors = torch.zeros_like(block)
        block_codes = torch.zeros_like(block)
        hinv_block = hinv[i1:i2, i1:i2]
        scale = zero = None
        for i in range(i2 - i1):
            p = i1 + i
            if p in segment_end and not all(kept_list[p : segment_end[p]]):
                # The group starts: its grid from its rounded columns' current weights.
                members = ~kept_at[p : segment_end[p]]
                current = block[:, i : i + (segment_end[p] - p)]
                s, z = grid(current.unsqueeze(1), ~members.reshape(1, 1, -1), order[p : segment_end[p]])
                scale, zero = s[:, 0].to(dtype), z[:, 0].to(dtype)
                scales[:, group_list[p]], zeros[:, group_list[p]] = s[:, 0], z[:, 0]
            if kept_list[p]:
                continue  # never rounded: no error to spread; its value is final once earlier ones are done
            if act_order:
                scale, zero = static_scales[:, group_list[p]], static_zeros[:, group_list[p]]
            column = block[:, i]
            code = round_to_codes(column, scale, zero)
            rounded = (code - zero) * scale
            err = (column - rounded) / hinv_block[i, i]
            block[:, i:].addr_(err, hinv_block[i, i:], alpha=-1)
            block[:, i] = rounded
            block_codes[:, i] = code
            errors[:, i] = err
        final[:, i1:i2] = block
        codes[:, order[i1:i2]] = block_codes.int()
        weight[:, i2:] -= errors @ hinv[i1:i2, i2:]

    out = torch.empty_like(final)
    out[:, order] = final
    if keep.any():  # the kept columns' codes: their group's grid applied to their final values
        kept_idx = columns[keep]
        grid = kept_idx // g
        codes[:, kept_idx] = round_to_codes(out[:, kept_idx].float(), scales[:, grid], zeros[:, grid]).int()
    return GroupQuant(codes, zeros.int(), scales, g), out
