"""Layer-by-layer RTN / AWQ / GPTQ / AWQ + GPTQ quantization (each optionally with kept FP16 neurons:
the -opt methods) of a transformers causal LM, driven by the architecture table (quant/architectures.py).

Every decoder layer sees the float model's own inputs (as in AutoAWQ; with `QuantSpec.quantized_inputs`,
those of the quantized layers before it, as in reference GPTQ): its calibration activations are captured,
AWQ's scale search runs on the family's scaling groups, scales fold into the smooth ops, clipping is searched
on the clip targets, then each linear becomes 4-bit codes plus, for kept neurons, an FP16 residual in the
same scaled space (dense W4 + residual == the kept weights). GPTQ rounds each linear with the Hessian of its
own captured inputs (in the scaled space after AWQ's scales) instead of to nearest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
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
from lape_awq.quant.awq.gptq import gptq_quantize, input_hessian
from lape_awq.quant.awq.search import ScaleSearch, apply_clip, apply_scales, search_clip, search_scales
from lape_awq.quant.errors import UserError
from lape_awq.quant.w4_math import QuantizedLinear, quantize_groups

# rtn: round to nearest. awq: AWQ's scales and clipping, then round to nearest. gptq: GPTQ's rounding from
# each linear's calibration Hessian. awq-gptq: AWQ's scales (no clipping: GPTQ's error compensation wants
# the float weights, and clipping searched for round-to-nearest only moves them), then GPTQ's rounding.
Method = Literal["rtn", "awq", "gptq", "awq-gptq"]
METHODS: tuple[str, ...] = ("rtn", "awq", "gptq", "awq-gptq")


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: the method, the group size, AWQ's search settings and, for the -opt methods,
    which MLP projections keep FP16 parts and whether the quantizer knows them (AWQ's searches and GPTQ
    treat them as exact). The kept neurons themselves are `quantize_model`'s argument."""

    method: Method = "awq"
    group_size: int = 128
    n_grid: int = 20
    duo_scaling: bool = True
    search_aware: bool = True  # the searches treat kept neurons as exact (else: quantize, then add residual)
    sparse_projections: tuple[str, ...] = MLP_PROJECTIONS
    chunk_size: int = 8  # calibration sequences per forward
    # Options added after the first checkpoints (`record` leaves them out at their defaults):
    scale_identity: bool = False  # the scale search also scores s = 1 (no scaling), which its grid lacks
    skip_scaling: tuple[str, ...] = ()  # scaling groups (architecture table names: qkv, vo, ...) not scaled
    # Each layer calibrates on the outputs of the layers before it as quantized (GPTQ's reference order,
    # so a layer's rounding can make up for its predecessors' error) instead of the float model's.
    quantized_inputs: bool = False
    act_order: bool = False  # GPTQ rounds each linear's columns by decreasing input energy (static grids)
    grid_search: bool = False  # GPTQ shrinks each group's range where that lowers the expected error

    def __post_init__(self) -> None:
        if self.group_size not in (32, 64, 128):
            raise UserError(f"group size must be 32, 64 or 128, got {self.group_size}")
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r} (one of {', '.join(METHODS)})")
        for name, on in (("act-order", self.act_order), ("grid-search", self.grid_search)):
            if on and not self.gptq:
                raise UserError(f"{name} is an option of GPTQ's rounding (--method gptq or awq-gptq)")
        if self.quantized_inputs and self.method == "rtn":
            raise UserError("--quantized-inputs is for the calibrated methods; rtn calibrates on nothing")
        bad = set(self.sparse_projections) - set(MLP_PROJECTIONS)
        if bad:
            raise UserError(
                f"sparse projections must be among {', '.join(MLP_PROJECTIONS)}, got {', '.join(bad)}"
            )

    def check_fits(self, arch: Architecture) -> None:
        """UserError unless every group of `skip_scaling` is one of the family's scaling groups."""
        unknown = set(self.skip_scaling) - {group.name for group in arch.scaling}
        if unknown:
            raise UserError(
                f"no scaling group {', '.join(sorted(unknown))} in {arch.name} "
                f"(its groups: {', '.join(group.name for group in arch.scaling)})"
            )

    def record(self) -> dict[str, Any]:
        """The spec as the checkpoint manifest records it: the options added later are left out at their
        defaults, so checkpoints made before they existed still match their recipe."""
        out = asdict(self)
        for name in ("scale_identity", "skip_scaling", "quantized_inputs", "act_order", "grid_search"):
            if out[name] == getattr(QuantSpec, name):
                del out[name]
        return out

    @property
    def awq_scales(self) -> bool:
        """Whether AWQ's per-channel scales are searched and folded in."""
        return self.method in ("awq", "awq-gptq")

    @property
    def gptq(self) -> bool:
        """Whether the codes come from GPTQ's rounding (else round to nearest)."""
        return self.method in ("gptq", "awq-gptq")


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
    weights: torch.Tensor | None = None,
) -> dict[str, QuantizedLinear]:
    """Quantize every decoder linear of `model` in place (scales folded into its norms and linears; with
    GPTQ, each linear left holding the weights its 4-bit form stands for) and return the 4-bit form of
    each, keyed by module name (`model.layers.3.mlp.down_proj`). `kept`: per layer, the sorted int64
    indices of the FFN neurons kept in FP16 (the -opt methods). `weights`: each calibration sequence's
    weight in the objectives (None: unweighted; `weighted_calibration_batch`)."""
    return quantize_models([model], calib, spec, [kept], progress, weights)[0]


@torch.no_grad()
def quantize_models(
    models: list[nn.Module],
    calib: torch.Tensor,
    spec: QuantSpec,
    kept: list[list[torch.Tensor] | None],
    progress: bool = True,
    weights: torch.Tensor | None = None,
) -> list[dict[str, QuantizedLinear]]:
    """`quantize_model` for several identical float copies of one model at once, each with its own kept
    neurons (None: plain AWQ / GPTQ): e.g. AWQ and AWQ-opt in one pass. Both calibrate on the float
    model's own activations, so every layer's inputs are computed once; a scaling group, clip target or
    GPTQ linear that keeps no neuron in any copy, with equal weights and inputs in every copy (the
    attention's, here), is searched / rounded once and applied to all. Each copy ends exactly as
    `quantize_model` would leave it alone."""
    if len(kept) != len(models):
        raise ValueError(f"{len(models)} models but {len(kept)} kept-neuron lists")
    if spec.quantized_inputs and len(models) > 1:
        # Each copy's layers see its own quantized predecessors: no two copies share an input.
        return [
            quantize_models([model], calib, spec, [keep], progress, weights)[0]
            for model, keep in zip(models, kept, strict=True)
        ]
    arch = architecture_of(models[0])
    spec.check_fits(arch)
    layers = [decoder_layers(model) for model in models]
    for keep in kept:
        if keep is not None and len(keep) != len(layers[0]):
            raise UserError(f"kept neurons cover {len(keep)} layers, the model has {len(layers[0])}")
    rtn = spec.method == "rtn"  # round-to-nearest needs no activations
    if weights is not None and len(weights) != len(calib):
        raise ValueError(f"{len(weights)} sequence weights for {len(calib)} calibration sequences")
    chunk_weights = None if weights is None else list(weights.split(spec.chunk_size))
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
        if rtn:
            for layer, sparse, result in zip(copies, sparses, results, strict=True):
                for name, linear in arch.layer_linears(layer).items():
                    result[f"model.layers.{i}.{name}"] = _quantize_linear(
                        linear, arch, spec, sparse.get(name), name
                    )
            continue
        outputs, inputs_of = _search_layer(copies, arch, inputs, calls[i], spec, sparses, chunk_weights)
        if spec.gptq:
            quantized = _gptq_layer(copies, arch, spec, sparses, inputs_of, chunk_weights)
        else:
            quantized = [
                {
                    name: _quantize_linear(linear, arch, spec, sparse.get(name), name)
                    for name, linear in arch.layer_linears(layer).items()
                }
                for layer, sparse in zip(copies, sparses, strict=True)
            ]
        for result, layer_result in zip(results, quantized, strict=True):
            result.update({f"model.layers.{i}.{name}": q for name, q in layer_result.items()})
        if spec.quantized_inputs:  # one copy here
            for name, q in quantized[0].items():
                copies[0].get_submodule(name).weight.copy_(_weight_of(q, arch, name))
            outputs = [
                _first(copies[0](x, *rest, **kw)) for x, (rest, kw) in zip(inputs, calls[i].rest, strict=True)
            ]
        inputs = outputs
    return results


def _weight_of(q: QuantizedLinear, arch: Architecture, name: str) -> torch.Tensor:
    """The float32 weights [out, in] that `q` stands for: its dequantized codes, plus the FP16 residual on
    its kept rows / columns."""
    weight = q.quant.dequantize().float()
    if q.sparse_idx is None:
        return weight
    if arch.neuron_dim(name) == "cols":
        weight[:, q.sparse_idx] += q.sparse.T.float()
    else:
        weight[q.sparse_idx] += q.sparse.float()
    return weight


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
    weights: list[torch.Tensor] | None,
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
        weights=weights,
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
    weights: list[torch.Tensor] | None,
) -> tuple[list[torch.Tensor], list[dict[str, list[torch.Tensor]]]]:
    """AWQ on one layer, in each copy (its own kept neurons): capture its activations, search and fold the
    scales (AWQ methods), search and apply clipping (AWQ with round-to-nearest); searches nothing tells
    apart run once. Returns the layer's float outputs (the next layer's inputs) and, per copy, each
    scaling group parent's captured inputs (per chunk) in the copy's scaled space: what its linears see."""
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
        if not spec.awq_scales or group.name in spec.skip_scaling or not _applies(copies[0], group):
            continue
        searches = [
            _scale_search(layer, arch, group, own[group.parent], parents[group.parent].rest, aware, weights)
            for layer, own, aware in zip(copies, inputs_of, awares, strict=True)
        ]
        shared = not any(s.keep_rows or s.keep_cols for s in searches) and _equal_everywhere(
            [layer.get_submodule(group.parent) for layer in copies], [s.inputs for s in searches]
        )
        if shared:
            scales = search_scales(
                searches[0], spec.group_size, spec.n_grid, spec.duo_scaling, spec.scale_identity
            )
            divided = [x / scales.to(x.dtype) for x in searches[0].inputs]
        for search in searches:
            if not shared:
                scales = search_scales(
                    search, spec.group_size, spec.n_grid, spec.duo_scaling, spec.scale_identity
                )
                divided = [x / scales.to(x.dtype) for x in search.inputs]
            apply_scales(search, scales)
            # The balanced linears now hold s-scaled weights, so their inputs are divided by s to match
            # (these lists are the clip search's inputs below).
            search.inputs[:] = divided

    if spec.method != "awq":
        return outputs, inputs_of
    for name in arch.clip:
        linears = [layer.get_submodule(name) for layer in copies]
        own_inputs = [own[_parent_of(arch, name)] for own in inputs_of]
        cols = name in arch.neuron_dims and arch.neuron_dim(name) == "cols"
        shared = all(name not in sparse for sparse in sparses) and _equal_everywhere(linears, own_inputs)
        max_val = None
        for linear, x, sparse, aware in zip(linears, own_inputs, sparses, awares, strict=True):
            keep = sparse.get(name)
            if max_val is None or not shared:
                keep_cols = aware.get(name) if cols else None
                max_val = search_clip(linear, x, spec.group_size, keep_cols, weights=weights)
            # Kept weights are never clipped: the residual restores them as they were, in either mode.
            apply_clip(linear, max_val, spec.group_size, keep if cols else None, None if cols else keep)
    return outputs, inputs_of


def _parent_of(arch: Architecture, linear: str) -> str:
    """The scaling-group parent whose captured input is `linear`'s input."""
    for group in arch.scaling:
        if linear in group.balance:
            return group.parent
    raise ValueError(f"{linear} is in no scaling group of {arch.name}")


def _gptq_layer(
    copies: list[nn.Module],
    arch: Architecture,
    spec: QuantSpec,
    sparses: list[dict[str, torch.Tensor]],
    inputs_of: list[dict[str, list[torch.Tensor]]],
    weights: list[torch.Tensor] | None,
) -> list[dict[str, QuantizedLinear]]:
    """GPTQ on one layer's linears, in each copy: each linear's Hessian from its captured float-model
    inputs (after AWQ's scales, in the copy's scaled space), shared by the linears that read one input
    (q/k/v, gate/up) and by the copies whose inputs are the same tensors; a linear with no kept neuron in
    any copy and equal weights and inputs everywhere is rounded once.

    Every linear of the layer sees the float inputs, not those its already-quantized predecessors in the
    layer would produce (GPTQ's "true sequential" order). That is the AWQ convention here and lets the
    copies share the Hessians and roundings the kept neurons do not change. Measured on the default
    model (Gemma 3 270M, layers 3 / 12 / 17, the layer's output error against the float layer on
    held-out ko/en/ja/zh text): the sequential order was 1.8% / 0.5% / 2.0% lower, too little to pay
    for the extra layer passes and per-copy inputs. AWQ's clipping before GPTQ was mixed there (+16% /
    -4% / +5%), hence none."""
    hessians: dict[tuple[int, ...], torch.Tensor] = {}

    def hessian(inputs: list[torch.Tensor]) -> torch.Tensor:
        key = tuple(id(x) for x in inputs)  # the captured tensors live while the layer is quantized
        if key not in hessians:
            hessians[key] = input_hessian(inputs, weights)
        return hessians[key]

    results: list[dict[str, QuantizedLinear]] = [{} for _ in copies]
    for name in arch.linears:
        linears = [layer.get_submodule(name) for layer in copies]
        own_inputs = [own[_parent_of(arch, name)] for own in inputs_of]
        shared = all(name not in sparse for sparse in sparses) and _equal_everywhere(linears, own_inputs)
        done = None
        for linear, x, sparse, result in zip(linears, own_inputs, sparses, results, strict=True):
            if done is None or not shared:
                done = _gptq_linear(linear, arch, spec, sparse.get(name), name, hessian(x))
            quantized, final = done
            linear.weight.copy_(final.to(linear.weight.dtype))
            result[name] = quantized
    return results


def _gptq_linear(
    m: nn.Linear, arch: Architecture, spec: QuantSpec, idx: torch.Tensor | None, name: str, h: torch.Tensor
) -> tuple[QuantizedLinear, torch.Tensor]:
    """GPTQ's 4-bit form of one linear, and the weights it stands for (the dequantized codes; kept rows
    and columns as their FP16 part makes them, up to its fp16 rounding). Kept rows (gate/up: output rows,
    which GPTQ rounds independently) are the float rows; kept columns (down: inputs) are never rounded
    and take the other columns' errors (quant/awq/gptq.py), unless the quantizer ignores them (naive
    sparse: round them like the rest, then restore their float values)."""
    w = m.weight.float()
    bias = None if m.bias is None else m.bias.detach().clone()
    cols = idx is not None and arch.neuron_dim(name) == "cols"
    keep = idx if cols and spec.search_aware else None
    quant, final = gptq_quantize(
        w, h, spec.group_size, keep, act_order=spec.act_order, grid_search=spec.grid_search
    )
    if idx is None:
        return QuantizedLinear(quant, bias), final
    dense = quant.dequantize()
    if cols:
        if not spec.search_aware:
            final[:, idx] = w[:, idx]
        return QuantizedLinear(quant, bias, idx, (final[:, idx] - dense[:, idx]).T.half()), final
    final[idx] = w[idx]
    return QuantizedLinear(quant, bias, idx, (w[idx] - dense[idx]).half()), final


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
