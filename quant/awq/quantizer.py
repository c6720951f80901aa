"""Layer-by-layer RTN / AWQ / AWQ-opt quantization of a transformers causal LM, driven by the architecture
table (quant/architectures.py).

Every decoder layer sees the float model's own inputs (as in AutoAWQ): its calibration activations
are captured, AWQ's scale search runs on the family's scaling groups, scales fold into the smooth ops,
clipping is searched on the clip targets, then each linear becomes 4-bit codes plus, for kept neurons, an
FP16 residual in the same scaled space (dense W4 + residual == the kept weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from tqdm import tqdm

from lape_awq.quant.architectures import (
    MLP_PROJECTIONS,
    Architecture,
    ScalingGroup,
    architecture_of,
    decoder_layers,
    projection,
)
from lape_awq.quant.awq.search import ScaleSearch, apply_clip, apply_scales, search_clip, search_scales
from lape_awq.quant.errors import UserError
from lape_awq.quant.w4_math import QuantizedLinear, quantize_groups

Method = Literal["rtn", "awq"]


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: the method, the group size, AWQ's search settings and, for AWQ-opt, which MLP
    projections keep FP16 parts and whether the searches know them. The kept neurons themselves are
    `quantize_model`'s argument."""

    method: Method = "awq"
    group_size: int = 128
    n_grid: int = 20
    duo_scaling: bool = True
    search_aware: bool = True  # the searches treat kept neurons as exact (else: quantize, then add residual)
    sparse_projections: tuple[str, ...] = MLP_PROJECTIONS
    chunk_size: int = 8  # calibration sequences per forward

    def __post_init__(self) -> None:
        if self.group_size not in (32, 64, 128):
            raise UserError(f"group size must be 32, 64 or 128, got {self.group_size}")
        if self.method not in ("rtn", "awq"):
            raise UserError(f"unknown method {self.method!r}")
        bad = set(self.sparse_projections) - set(MLP_PROJECTIONS)
        if bad:
            raise UserError(
                f"sparse projections must be among {', '.join(MLP_PROJECTIONS)}, got {', '.join(bad)}"
            )


@dataclass
class _Calls:
    """What one module was called with, per calibration chunk: its input and its other arguments."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    rest: list[tuple[tuple, dict]] = field(default_factory=list)
    keep_inputs: bool = True  # False where the inputs come from elsewhere (the previous layer's outputs)

    def hook(self, _m: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, rest, kw = _split_hidden(args, kwargs)
        if self.keep_inputs:
            self.inputs.append(hidden)
        self.rest.append((rest, kw))


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], args[1:], kwargs
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


@torch.no_grad()
def _layer_call_capture(
    model: nn.Module, chunks: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[_Calls]]:
    """Layer 0's inputs per chunk, and every layer's other call arguments (one FP pass); each later
    layer's inputs are the float outputs of the layer before, computed as the layers are searched."""
    layers = decoder_layers(model)
    calls = [_Calls(keep_inputs=i == 0) for i in range(len(layers))]
    handles = [
        layer.register_forward_pre_hook(c.hook, with_kwargs=True)
        for layer, c in zip(layers, calls, strict=True)
    ]
    try:
        for chunk in chunks:
            model.model(input_ids=chunk, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return calls[0].inputs, calls


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    calib: torch.Tensor,
    spec: QuantSpec,
    kept: list[torch.Tensor] | None = None,
    progress: bool = True,
) -> dict[str, QuantizedLinear]:
    """Quantize every decoder linear of `model` in place (scales folded into its norms and linears) and
    return the 4-bit form of each, keyed by module name (`model.layers.3.mlp.down_proj`). `kept`: per
    layer, the sorted int64 indices of the FFN neurons kept in FP16 (AWQ-opt)."""
    return quantize_models([model], calib, spec, [kept], progress)[0]


@torch.no_grad()
def quantize_models(
    models: list[nn.Module],
    calib: torch.Tensor,
    spec: QuantSpec,
    kept: list[list[torch.Tensor] | None],
    progress: bool = True,
) -> list[dict[str, QuantizedLinear]]:
    """`quantize_model` for several identical float copies of one model at once, each with its own kept
    neurons (None: plain AWQ): AWQ and AWQ-opt in one pass. Both calibrate on the float model's own
    activations, so every layer's inputs are computed once; a scaling group or clip target that keeps no
    neuron in any copy, with equal weights and inputs in every copy (the attention's, here), is searched
    once and applied to all. Each copy ends exactly as `quantize_model` would leave it alone."""
    if len(kept) != len(models):
        raise ValueError(f"{len(models)} models but {len(kept)} kept-neuron lists")
    arch = architecture_of(models[0])
    layers = [decoder_layers(model) for model in models]
    for keep in kept:
        if keep is not None and len(keep) != len(layers[0]):
            raise UserError(f"kept neurons cover {len(keep)} layers, the model has {len(layers[0])}")
    rtn = spec.method == "rtn"  # round-to-nearest needs no activations
    if rtn:
        inputs, calls = [], [_Calls() for _ in layers[0]]
    else:
        inputs, calls = _layer_call_capture(models[0], list(calib.split(spec.chunk_size)))
    results: list[dict[str, QuantizedLinear]] = [{} for _ in models]
    what = spec.method + (f", {len(models)} checkpoints" if len(models) > 1 else "")
    bar = tqdm(range(len(layers[0])), desc=f"quantize ({what})", unit="layer", disable=not progress)
    for i in bar:
        copies = [model_layers[i] for model_layers in layers]
        sparses = [_sparse(arch, spec, keep[i] if keep is not None else None) for keep in kept]
        if not rtn:
            inputs = _search_layer(copies, arch, inputs, calls[i], spec, sparses)
        for layer, sparse, result in zip(copies, sparses, results, strict=True):
            for name, linear in arch.layer_linears(layer).items():
                result[f"model.layers.{i}.{name}"] = _quantize_linear(
                    linear, arch, spec, sparse.get(name), name
                )
    return results


def _sparse(arch: Architecture, spec: QuantSpec, keep: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """MLP linear path -> kept neuron indices, for the projections that keep FP16 parts."""
    if keep is None or not keep.numel():
        return {}
    return {name: keep for name in arch.neuron_dims if projection(name) in spec.sparse_projections}


def _applies(layer: nn.Module, group: ScalingGroup) -> bool:
    if not group.needs_matching_shapes:
        return True
    smooth = layer.get_submodule(group.smooth).weight.shape
    return all(layer.get_submodule(name).weight.shape == smooth for name in group.balance)


def _scale_search(
    layer: nn.Module,
    arch: Architecture,
    group: ScalingGroup,
    inputs: list[torch.Tensor],
    rest: list[tuple[tuple, dict]],
    aware: dict[str, torch.Tensor],
) -> ScaleSearch:
    """A table entry bound to this layer's modules and captured activations (`inputs` is bound, not
    copied: the caller divides it by the chosen scales)."""
    parent = layer.get_submodule(group.parent)

    def inspect(chunk: int, x: torch.Tensor) -> torch.Tensor:
        args, kw = rest[chunk]
        return _first(parent(x, *args, **kw))

    kept = {name: aware[name] for name in group.balance if name in aware}
    return ScaleSearch(
        group.name,
        layer.get_submodule(group.smooth),
        [layer.get_submodule(name) for name in group.balance],
        inputs,
        inspect,
        arch.norm_weight_offset,
        keep_rows={layer.get_submodule(n): k for n, k in kept.items() if arch.neuron_dim(n) == "rows"},
        keep_cols={layer.get_submodule(n): k for n, k in kept.items() if arch.neuron_dim(n) == "cols"},
    )


def _equal_everywhere(modules: list[nn.Module], inputs: list[list[torch.Tensor]]) -> bool:
    """True when every copy's module has the same parameters and the same input tensors as the first's."""
    first = list(modules[0].parameters())
    same_weights = all(
        all(torch.equal(a, b) for a, b in zip(first, module.parameters(), strict=True))
        for module in modules[1:]
    )
    return same_weights and all(all(a is b for a, b in zip(inputs[0], x, strict=True)) for x in inputs[1:])


def _search_layer(
    copies: list[nn.Module],
    arch: Architecture,
    inputs: list[torch.Tensor],
    calls: _Calls,
    spec: QuantSpec,
    sparses: list[dict[str, torch.Tensor]],
) -> list[torch.Tensor]:
    """AWQ on one layer, in each copy (its own kept neurons): capture its activations, search and fold the
    scales, search and apply clipping; searches nothing tells apart run once. Returns the layer's float
    outputs, the next layer's inputs."""
    parents = {group.parent: _Calls() for group in arch.scaling}
    handles = [
        copies[0].get_submodule(name).register_forward_pre_hook(c.hook, with_kwargs=True)
        for name, c in parents.items()
    ]
    try:  # every copy is still the float layer here
        outputs = [
            _first(copies[0](x, *rest, **kw)) for x, (rest, kw) in zip(inputs, calls.rest, strict=True)
        ]
    finally:
        for h in handles:
            h.remove()

    # Each copy's linears see their inputs in its own scaled space: per copy, its own list per parent (the
    # same tensors until a search that differs between copies divides them).
    inputs_of = [{name: list(c.inputs) for name, c in parents.items()} for _ in copies]
    awares = [sparse if spec.search_aware else {} for sparse in sparses]
    for group in arch.scaling:
        if not _applies(copies[0], group):
            continue
        searches = [
            _scale_search(layer, arch, group, own[group.parent], parents[group.parent].rest, aware)
            for layer, own, aware in zip(copies, inputs_of, awares, strict=True)
        ]
        shared = not any(s.keep_rows or s.keep_cols for s in searches) and _equal_everywhere(
            [layer.get_submodule(group.parent) for layer in copies], [s.inputs for s in searches]
        )
        if shared:
            scales = search_scales(searches[0], spec.group_size, spec.n_grid, spec.duo_scaling)
            divided = [x / scales.to(x.dtype) for x in searches[0].inputs]
        for search in searches:
            if not shared:
                scales = search_scales(search, spec.group_size, spec.n_grid, spec.duo_scaling)
                divided = [x / scales.to(x.dtype) for x in search.inputs]
            apply_scales(search, scales)
            # The balanced linears now hold s-scaled weights, so their inputs are divided by s to match
            # (these lists are the clip search's inputs below).
            search.inputs[:] = divided

    balanced_by = {name: group.parent for group in arch.scaling for name in group.balance}
    for name in arch.clip:
        linears = [layer.get_submodule(name) for layer in copies]
        own_inputs = [own[balanced_by[name]] for own in inputs_of]
        cols = name in arch.neuron_dims and arch.neuron_dim(name) == "cols"
        shared = all(name not in sparse for sparse in sparses) and _equal_everywhere(linears, own_inputs)
        max_val = None
        for linear, x, sparse, aware in zip(linears, own_inputs, sparses, awares, strict=True):
            keep = sparse.get(name)
            if max_val is None or not shared:
                max_val = search_clip(linear, x, spec.group_size, aware.get(name) if cols else None)
            # Kept weights are never clipped: the residual restores them as they were, in either mode.
            apply_clip(linear, max_val, spec.group_size, keep if cols else None, None if cols else keep)
    return outputs


def _quantize_linear(
    m: nn.Linear, arch: Architecture, spec: QuantSpec, idx: torch.Tensor | None, name: str
) -> QuantizedLinear:
    w = m.weight.float()
    bias = None if m.bias is None else m.bias.detach().clone()
    if idx is None:
        return QuantizedLinear(quantize_groups(w, spec.group_size), bias)
    if arch.neuron_dim(name) == "cols":
        skip = None
        if spec.search_aware:
            skip = torch.zeros(w.shape[1], dtype=torch.bool)
            skip[idx] = True
        quant = quantize_groups(w, spec.group_size, skip)
        residual = (w[:, idx] - quant.dequantize()[:, idx]).T
    else:
        quant = quantize_groups(w, spec.group_size)
        residual = w[idx] - quant.dequantize()[idx]
    return QuantizedLinear(quant, bias, idx, residual.half())
