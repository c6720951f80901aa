"""AWQ's two searches (Lin et al. 2024, AutoAWQ behaviour): per-channel scales for a group of linears
that share an input, and per-group clipping ranges. Both can be told about kept (FP16) neurons, so
they score the layer with those neurons already exact."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lape_awq.quant.w4_math import fake_quantize, quantize_groups


@dataclass
class ScaleSearch:
    """One scaling group bound to a layer: the linears fed by one input, the smooth op before them (scales
    fold into it), their inputs and the output to score; kept rows / columns count as exact."""

    name: str
    smooth: nn.Module
    linears: list[nn.Linear]
    inputs: list[torch.Tensor]  # per calibration chunk, the linears' input
    inspect: Callable[[int, torch.Tensor], torch.Tensor]  # (chunk index, input) -> output scored by MSE
    norm_weight_offset: float = 0.0  # a norm `smooth` multiplies by (offset + weight)
    keep_rows: dict[nn.Linear, torch.Tensor] = field(default_factory=dict)
    keep_cols: dict[nn.Linear, torch.Tensor] = field(default_factory=dict)
    # per calibration chunk, each sequence's weight in the statistics and the loss (None: unweighted)
    weights: list[torch.Tensor] | None = None


@torch.no_grad()
def fake_quantize_linear(group: ScaleSearch, linear: nn.Linear, weight: torch.Tensor, g: int) -> torch.Tensor:
    return fake_quantize(weight, g, group.keep_rows.get(linear), group.keep_cols.get(linear))


@torch.no_grad()
def search_scales(
    group: ScaleSearch,
    group_size: int,
    n_grid: int = 20,
    duo_scaling: bool = True,
    identity: bool = False,
) -> torch.Tensor:
    """The grid search over s = mean|x|^a (/ mean|w|^(1-a) with duo scaling), normalised by
    sqrt(max*min), scored by the MSE of `inspect`'s output with the linears fake-quantized. With
    `identity`, s = 1 is scored too (with duo scaling, a = 0 is 1 / mean|w|, not "no scaling"), and
    wins ties."""
    if group.weights is None:
        x_sum = sum(x.abs().float().reshape(-1, x.shape[-1]).sum(0) for x in group.inputs)
        x_mean = x_sum / sum(x.numel() // x.shape[-1] for x in group.inputs)
    else:
        x_sum = sum(
            (x.abs().float() * _per_token(w, x)).reshape(-1, x.shape[-1]).sum(0)
            for x, w in zip(group.inputs, group.weights, strict=True)
        )
        x_mean = x_sum / sum(
            float(w.double().sum()) * (x[0].numel() // x.shape[-1])
            for x, w in zip(group.inputs, group.weights, strict=True)
        )
    weight = torch.cat([m.weight.float() for m in group.linears], dim=0)
    w = weight.reshape(-1, group_size).abs()
    w_mean = (w / (w.amax(dim=1, keepdim=True) + 1e-6)).reshape(weight.shape).mean(0)

    reference = [group.inspect(c, x) for c, x in enumerate(group.inputs)]
    originals = [m.weight.detach().clone() for m in group.linears]
    best_loss, best_scales = torch.inf, torch.ones_like(x_mean)
    candidates = [None] if identity else []
    candidates += [step / n_grid for step in range(n_grid)]
    try:
        for ratio in candidates:
            if ratio is None:
                s = torch.ones_like(x_mean)
            elif duo_scaling:
                s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp_min(1e-4)
            else:
                s = x_mean.pow(ratio).clamp_min(1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for m, w0 in zip(group.linears, originals, strict=True):
                scaled = w0.float() * s
                m.weight.copy_((fake_quantize_linear(group, m, scaled, group_size) / s).to(w0.dtype))
            loss = _loss(group, reference)
            if loss < best_loss:
                best_loss, best_scales = float(loss), s.clone()
    finally:
        for m, w0 in zip(group.linears, originals, strict=True):
            m.weight.copy_(w0)
    return best_scales


def _per_token(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sequence weights [b] shaped to broadcast over a chunk's [b, ..., features] tensor."""
    return weights.to(torch.float32).reshape(-1, *([1] * (x.dim() - 1)))


def _loss(group: ScaleSearch, reference: list[torch.Tensor]) -> torch.Tensor:
    """The (token-weighted) mean squared error of `inspect`'s outputs against the float ones."""
    if group.weights is None:
        return sum(
            (group.inspect(c, x).float() - ref.float()).pow(2).sum()
            for c, (x, ref) in enumerate(zip(group.inputs, reference, strict=True))
        ) / sum(ref.numel() for ref in reference)
    total = sum(
        ((group.inspect(c, x).float() - ref.float()).pow(2) * _per_token(w, ref)).sum()
        for c, (x, ref, w) in enumerate(zip(group.inputs, reference, group.weights, strict=True))
    )
    return total / sum(
        float(w.double().sum()) * ref[0].numel() for ref, w in zip(reference, group.weights, strict=True)
    )


@torch.no_grad()
def apply_scales(group: ScaleSearch, scales: torch.Tensor) -> None:
    """Fold 1/s into the smooth op and s into the linears: the float model's outputs are unchanged."""
    smooth, offset = group.smooth, group.norm_weight_offset
    s = scales.to(smooth.weight.device)
    if isinstance(smooth, nn.Linear):
        smooth.weight.div_(s.view(-1, 1).to(smooth.weight.dtype))
        if smooth.bias is not None:
            smooth.bias.div_(s.to(smooth.bias.dtype))
    elif offset:  # the norm scales by (offset + w): the new w is (offset + w) / s - offset
        smooth.weight.copy_(((offset + smooth.weight.double()) / s.double() - offset).to(smooth.weight.dtype))
    else:
        smooth.weight.div_(s.to(smooth.weight.dtype))
    for m in group.linears:
        m.weight.mul_(s.view(1, -1).to(m.weight.dtype))


@torch.no_grad()
def search_clip(
    linear: nn.Linear,
    inputs: Sequence[torch.Tensor],
    group_size: int,
    keep_cols: torch.Tensor | None = None,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    n_sample_tokens: int = 512,
    out_batch: int = 256,
    weights: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per (output channel, group) the max |w| that minimises the group's partial-output MSE when the
    weights are clamped to it and quantized. Kept input columns stay exact and out of the range.
    `weights`, per chunk of `inputs`, weighs each sequence's tokens in the MSE (None: unweighted)."""
    weight = linear.weight.float()
    out_features, in_features = weight.shape
    if weights is not None:  # w * (x . dw)^2 == (sqrt(w) x . dw)^2
        inputs = [t.float() * _per_token(w, t).sqrt() for t, w in zip(inputs, weights, strict=True)]
    x = torch.cat([t.reshape(-1, in_features) for t in inputs]).float()
    x = x[:: max(1, x.shape[0] // n_sample_tokens)][:n_sample_tokens]
    x = x.reshape(x.shape[0], -1, group_size)  # tokens, groups, g
    skip = torch.zeros(in_features, dtype=torch.bool)
    if keep_cols is not None:
        skip[keep_cols] = True
    skip_g = skip.reshape(1, -1, group_size)
    best = torch.empty(out_features, in_features // group_size)
    for start in range(0, out_features, out_batch):
        w = weight[start : start + out_batch].reshape(-1, in_features // group_size, group_size)
        org_max = w.abs().masked_fill(skip_g, 0.0).amax(dim=-1, keepdim=True)
        org_out = torch.einsum("tgk,ogk->otg", x, w)
        best_err = torch.full(org_max.shape[:2], torch.inf)
        best_max = org_max.squeeze(-1).clone()
        for step in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - step / n_grid)
            clamped = torch.where(skip_g, w, w.clamp(-max_val, max_val))
            q = quantize_groups(clamped.reshape(w.shape[0], -1), group_size, skip).dequantize()
            q = torch.where(skip, weight[start : start + out_batch], q).reshape(w.shape)
            err = (torch.einsum("tgk,ogk->otg", x, q) - org_out).pow(2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, max_val.squeeze(-1), best_max)
        best[start : start + out_batch] = best_max
    return best


@torch.no_grad()
def apply_clip(
    linear: nn.Linear,
    max_val: torch.Tensor,
    group_size: int,
    keep_cols: torch.Tensor | None = None,
    keep_rows: torch.Tensor | None = None,
) -> None:
    """Clamp each (output channel, group) of the weight to +-max_val; kept rows / columns untouched."""
    w = linear.weight
    limit = max_val.repeat_interleave(group_size, dim=1).to(w.dtype)
    clamped = torch.maximum(torch.minimum(w, limit), -limit)
    if keep_cols is not None and keep_cols.numel():
        clamped[:, keep_cols] = w[:, keep_cols]
    if keep_rows is not None and keep_rows.numel():
        clamped[keep_rows] = w[keep_rows]
    w.copy_(clamped)
