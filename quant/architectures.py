"""What lape-awq knows of each model family, as data: one `Architecture` per family, looked up by the HF
config's `model_type`. Adding a model is adding an entry (in the spirit of llm-compressor's AWQ mappings).

Every name is a module path inside one decoder layer (`model.layers.i`). The quantizer reads the linears,
the scaling groups and the clip targets; LAPE reads the MLP activation; the checkpoint format reads the
linears and where an FFN neuron lives in each MLP linear.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lape_awq.kernels.sparse_correction import SparseKind
from lape_awq.quant.errors import UserError


@dataclass(frozen=True)
class ScalingGroup:
    """AWQ's per-channel scales for the `balance` linears, which all read the output of `smooth`: 1/s folds
    into `smooth` (a norm or a linear), s into each balanced linear. The scales are scored by the MSE of
    `parent`'s output, and `parent`'s input is what the balanced linears see."""

    name: str
    smooth: str
    balance: tuple[str, ...]
    parent: str
    # v -> o: only when o reads v's outputs one to one; with GQA, v has fewer outputs than o has inputs.
    needs_matching_shapes: bool = False


@dataclass(frozen=True)
class Architecture:
    """One model family: its quantized linears, the gated MLP (LAPE counts act_fn(gate(x)) > 0 per neuron),
    AWQ's scaling groups and clip targets, and the norm kind scales fold into."""

    name: str
    linears: tuple[str, ...]
    mlp: str
    gate: str
    mlp_activation: str
    neuron_dims: dict[str, SparseKind]
    scaling: tuple[ScalingGroup, ...]
    clip: tuple[str, ...]
    # RMSNorm multiplies by (norm_weight_offset + weight): Gemma stores weight - 1.
    norm_weight_offset: float = 0.0

    def mlp_linear(self, proj: str) -> str:
        """The path of an MLP linear from its own name (`down_proj` -> `mlp.down_proj`)."""
        for name in self.neuron_dims:
            if projection(name) == proj:
                return name
        raise UserError(f"{proj!r} is not an MLP projection of {self.name} ({', '.join(self.neuron_dims)})")

    def neuron_dim(self, linear: str) -> SparseKind:
        """Where FFN neuron j lives in an MLP linear (`mlp.down_proj` or just `down_proj`)."""
        return self.neuron_dims[self.mlp_linear(projection(linear))]

    def layer_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """The quantized linears of one decoder layer, keyed by their path (`self_attn.q_proj`, ...)."""
        return {name: layer.get_submodule(name) for name in self.linears}

    def check_layer(self, layer: nn.Module, index: int) -> None:
        """UserError unless the layer has every module this entry names (the linears as nn.Linear)."""
        for name in dict.fromkeys((*self.linears, *(g.smooth for g in self.scaling), self.mlp)):
            module = _lookup(layer, name)
            if module is None:
                raise UserError(f"layer {index}: no {name}")
            if name in self.linears and not isinstance(module, nn.Linear):
                raise UserError(f"layer {index}: {name} is not an nn.Linear")
        if not callable(_lookup(layer, self.mlp_activation)):
            raise UserError(f"layer {index}: no {self.mlp_activation}")

    def activation(self, layer: nn.Module) -> tuple[nn.Linear, nn.Module]:
        """The gate linear and the activation LAPE reads: neuron j fires when act(gate(x))[j] > 0."""
        return layer.get_submodule(self.gate), _lookup(layer, self.mlp_activation)


def _lookup(layer: nn.Module, path: str) -> object | None:
    obj: object | None = layer
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


def projection(name: str) -> str:
    """`mlp.down_proj` -> `down_proj`."""
    return name.rpartition(".")[2]


_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# The MLP projections every family here has; a checkpoint's `sparse.projections` lists some of them.
# FFN neuron j is output row j of gate/up and input column j of down.
MLP_PROJECTIONS = tuple(projection(name) for name in _MLP)
_NEURON_DIMS: dict[str, SparseKind] = {
    "mlp.gate_proj": "rows",
    "mlp.up_proj": "rows",
    "mlp.down_proj": "cols",
}
# AutoAWQ clips every linear but q/k: their error reaches the output through the softmax, which the
# per-linear output MSE of the clip search does not see.
_CLIP = ("self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _scaling(mlp_norm: str) -> tuple[ScalingGroup, ...]:
    """AutoAWQ's four groups of a Llama-style layer; `mlp_norm` is the norm feeding the MLP."""
    return (
        ScalingGroup("qkv", "input_layernorm", _ATTENTION[:3], parent="self_attn"),
        ScalingGroup("vo", "self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", True),
        ScalingGroup("gate_up", mlp_norm, _MLP[:2], parent="mlp"),
        ScalingGroup("down", "mlp.up_proj", ("mlp.down_proj",), parent="mlp.down_proj"),
    )


def _llama_style(name: str, mlp_norm: str, norm_weight_offset: float = 0.0) -> Architecture:
    """A decoder layer with Llama's module names; the families differ in the MLP's norm and its kind."""
    return Architecture(
        name=name,
        linears=_ATTENTION + _MLP,
        mlp="mlp",
        gate="mlp.gate_proj",
        mlp_activation="mlp.act_fn",
        neuron_dims=_NEURON_DIMS,
        scaling=_scaling(mlp_norm),
        clip=_CLIP,
        norm_weight_offset=norm_weight_offset,
    )


LLAMA = _llama_style("llama", mlp_norm="post_attention_layernorm")
# Gemma 2/3 norm the attention output too (post_attention_layernorm, before the residual add): the MLP's
# input norm is pre_feedforward_layernorm. Their RMSNorm scales by (1 + weight).
GEMMA = _llama_style("gemma", mlp_norm="pre_feedforward_layernorm", norm_weight_offset=1.0)

# HF `model_type` -> family. Qwen3 and Gemma 3 norm q and k per head inside attention: that comes after
# q_proj / k_proj and does not touch the input scales, so they share their family's entry.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma2": GEMMA,
    "gemma3_text": GEMMA,
}
SUPPORTED = "Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text)"


def architecture_of(model: nn.Module) -> Architecture:
    """The entry for an HF causal LM (by `config.model_type`), checked against its decoder layers."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(str(model_type))
    if arch is None:
        raise UserError(_unsupported(model, f"model_type {model_type!r} is not in the architecture table"))
    for i, layer in enumerate(decoder_layers(model)):
        try:
            arch.check_layer(layer, i)
        except UserError as exc:
            raise UserError(_unsupported(model, str(exc))) from None
    return arch


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of an HF causal LM (`model.model.layers`)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError(_unsupported(model, "no model.layers decoder stack"))
    return layers


def _unsupported(model: nn.Module, why: str) -> str:
    return f"unsupported architecture {type(model).__name__} ({why}); lape-awq supports {SUPPORTED}"
