"""Layer-by-layer RTN / AWQ / AWQ-opt quantization of a transformers causal LM.

Every decoder layer sees the float model's own inputs (as in AutoAWQ): its calibration activations
are captured, AWQ's scale search runs on the four scaling groups, scales fold into the previous ops,
clipping is searched (not for q/k), then each linear becomes 4-bit codes plus, for kept neurons, an
FP16 residual in the same scaled space (dense W4 + residual == the kept weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm import tqdm

from lape_awq.quant.awq_search import ScaleGroup, apply_clip, apply_scales, search_clip, search_scales
from lape_awq.quant.errors import UserError
from lape_awq.quant.model_loading import decoder_layers
from lape_awq.quant.w4_math import GroupQuant, quantize_groups

ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
Method = Literal["rtn", "awq"]


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize. `kept` neurons (per layer, sorted int64) make it AWQ-opt."""

    method: Method = "awq"
    group_size: int = 128
    n_grid: int = 20
    duo_scaling: bool = True
    search_aware: bool = True  # the searches treat kept neurons as exact (else: quantize, then add residual)
    sparse_projections: tuple[str, ...] = MLP_LINEARS
    chunk_size: int = 8  # calibration sequences per forward

    def __post_init__(self) -> None:
        if self.group_size not in (32, 64, 128):
            raise UserError(f"group size must be 32, 64 or 128, got {self.group_size}")
        if self.method not in ("rtn", "awq"):
            raise UserError(f"unknown method {self.method!r}")
        bad = set(self.sparse_projections) - set(MLP_LINEARS)
        if bad:
            raise UserError(
                f"sparse projections must be among {', '.join(MLP_LINEARS)}, got {', '.join(bad)}"
            )


@dataclass
class QuantizedLinear:
    """One linear's 4-bit form. `sparse` is [k, in] (gate/up rows) or [k, out] (down columns)."""

    quant: GroupQuant
    bias: torch.Tensor | None
    sparse_idx: torch.Tensor | None = None
    sparse: torch.Tensor | None = None


class _Stop(Exception):
    pass


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
) -> tuple[list[torch.Tensor], list[list]]:
    """Layer 0's inputs per chunk, and every layer's other call arguments per chunk (one FP pass)."""
    layers = decoder_layers(model)
    first_inputs: list[torch.Tensor] = []
    calls: list[list] = [[] for _ in layers]

    def hook_for(i: int) -> Callable:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden, rest, kw = _split_hidden(args, kwargs)
            if i == 0:
                first_inputs.append(hidden)
            calls[i].append((rest, kw))

        return hook

    handles = [
        layer.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    try:
        for chunk in chunks:
            model.model(input_ids=chunk, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return first_inputs, calls


def _mlp_norm(layer: nn.Module) -> nn.Module:
    # Gemma 2/3: pre_feedforward_layernorm feeds the MLP; Llama/Qwen/Mistral: post_attention_layernorm.
    norm = getattr(layer, "pre_feedforward_layernorm", None) or getattr(
        layer, "post_attention_layernorm", None
    )
    if norm is None:
        raise UserError(f"{type(layer).__name__}: cannot find the MLP's input norm")
    return norm


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    calib: torch.Tensor,
    spec: QuantSpec,
    kept: list[torch.Tensor] | None = None,
    progress: bool = True,
) -> dict[str, QuantizedLinear]:
    """Quantize every decoder linear of `model` in place (scales folded into its norms and linears) and
    return the 4-bit form of each, keyed by module name (`model.layers.3.mlp.down_proj`)."""
    layers = decoder_layers(model)
    if kept is not None and len(kept) != len(layers):
        raise UserError(f"kept neurons cover {len(kept)} layers, the model has {len(layers)}")
    rtn = spec.method == "rtn"  # round-to-nearest needs no activations
    if rtn:
        inputs, calls = [], [[] for _ in layers]
    else:
        inputs, calls = _layer_call_capture(model, list(calib.split(spec.chunk_size)))
    result: dict[str, QuantizedLinear] = {}
    bar = tqdm(layers, desc=f"quantize ({spec.method})", unit="layer", disable=not progress)
    for i, layer in enumerate(bar):
        keep = kept[i] if kept is not None else torch.empty(0, dtype=torch.long)
        if rtn:
            sparse = _sparse(spec, keep)
            quantized = {
                name: _quantize_linear(name, m, spec, sparse) for name, m in layer_linears(layer).items()
            }
        else:
            inputs, quantized = _quantize_layer(layer, inputs, calls[i], spec, keep)
        result.update({f"model.layers.{i}.{name}": q for name, q in quantized.items()})
    return result


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The seven quantized linears of a decoder layer, keyed `self_attn.q_proj` ... `mlp.down_proj`."""
    linears = {f"self_attn.{n}": getattr(layer.self_attn, n) for n in ATTN_LINEARS}
    return linears | {f"mlp.{n}": getattr(layer.mlp, n) for n in MLP_LINEARS}


def _sparse(spec: QuantSpec, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Projection name -> kept neuron indices, for the projections that keep FP16 parts."""
    return {n: keep for n in spec.sparse_projections} if keep.numel() else {}


def _quantize_layer(
    layer: nn.Module, inputs: list[torch.Tensor], calls: list, spec: QuantSpec, keep: torch.Tensor
) -> tuple[list[torch.Tensor], dict[str, QuantizedLinear]]:
    attn, mlp = layer.self_attn, layer.mlp
    linears = layer_linears(layer)
    feats: dict[str, list[torch.Tensor]] = {"attn": [], "o": [], "mlp": [], "down": []}
    attn_calls: list[tuple[tuple, dict]] = []

    def capture(key: str) -> Callable:
        return lambda _m, args: feats[key].append(args[0])

    def capture_attn(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, rest, kw = _split_hidden(args, kwargs)
        feats["attn"].append(hidden)
        attn_calls.append((rest, kw))

    handles = [
        attn.register_forward_pre_hook(capture_attn, with_kwargs=True),
        attn.o_proj.register_forward_pre_hook(capture("o")),
        mlp.register_forward_pre_hook(capture("mlp")),
        mlp.down_proj.register_forward_pre_hook(capture("down")),
    ]
    try:
        outputs = [_first(layer(x, *rest, **kw)) for x, (rest, kw) in zip(inputs, calls, strict=True)]
    finally:
        for h in handles:
            h.remove()

    sparse = _sparse(spec, keep)
    aware = sparse if spec.search_aware else {}
    if spec.method == "awq":
        groups = [
            ScaleGroup(
                "qkv", layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], feats["attn"],
                lambda c, x: _first(attn(x, *attn_calls[c][0], **attn_calls[c][1])),
            ),
            ScaleGroup(
                "gate_up", _mlp_norm(layer), [mlp.gate_proj, mlp.up_proj], feats["mlp"], lambda _c, x: mlp(x),
                keep_rows={getattr(mlp, n): k for n, k in aware.items() if n != "down_proj"},
            ),
            ScaleGroup(
                "down", mlp.up_proj, [mlp.down_proj], feats["down"], lambda _c, x: mlp.down_proj(x),
                keep_cols={mlp.down_proj: aware["down_proj"]} if "down_proj" in aware else {},
            ),
        ]  # fmt: skip
        if attn.v_proj.weight.shape == attn.o_proj.weight.shape:  # v -> o only without GQA
            groups.insert(
                1, ScaleGroup("vo", attn.v_proj, [attn.o_proj], feats["o"], lambda _c, x: attn.o_proj(x))
            )
        found = [search_scales(g, spec.group_size, spec.n_grid, spec.duo_scaling) for g in groups]
        for group, scales in zip(groups, found, strict=True):
            apply_scales(group, scales)
            for j, x in enumerate(group.inputs):
                group.inputs[j] = x / scales.to(x.dtype)  # type: ignore[index]
        clip_inputs = {"self_attn.v_proj": feats["attn"], "self_attn.o_proj": feats["o"]}
        clip_inputs |= {
            "mlp.gate_proj": feats["mlp"],
            "mlp.up_proj": feats["mlp"],
            "mlp.down_proj": feats["down"],
        }
        for name, xs in clip_inputs.items():
            down = name == "mlp.down_proj"
            max_val = search_clip(
                linears[name], xs, spec.group_size, aware.get("down_proj") if down else None
            )
            # Kept weights are never clipped: the residual restores them as they were, in either mode.
            protect = sparse.get(name.split(".")[1])
            apply_clip(
                linears[name], max_val, spec.group_size, protect if down else None, None if down else protect
            )
    return outputs, {name: _quantize_linear(name, m, spec, sparse) for name, m in linears.items()}


def _quantize_linear(
    name: str, m: nn.Linear, spec: QuantSpec, sparse: dict[str, torch.Tensor]
) -> QuantizedLinear:
    w = m.weight.float()
    bias = None if m.bias is None else m.bias.detach().clone()
    proj = name.split(".")[1]
    idx = sparse.get(proj)
    if idx is None:
        return QuantizedLinear(quantize_groups(w, spec.group_size), bias)
    if proj == "down_proj":
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
