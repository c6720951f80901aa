"""The checkpoint's layout: file names, the quantization_config written to config.json, and every tensor a
checkpoint of a given config must hold (docs/checkpoint-format.md).

Plain AWQ is AutoAWQ's "gemm" layout (`quant_method: awq`); AWQ-opt adds sparse tensors to the MLP
linears (`quant_method: lape_awq`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lape_awq.quant.architectures import Architecture, architecture_of, decoder_layers
from lape_awq.quant.errors import UserError

WEIGHTS = "model.safetensors"
MANIFEST = "lape_awq_manifest.json"
QUANT_METHODS = ("awq", "lape_awq")
SPARSE_DTYPE = torch.float16
GROUP_SIZES = (32, 64, 128)


def quantization_config(group_size: int, sparse: dict[str, Any] | None) -> dict[str, Any]:
    """AutoAWQ's keys, so stock loaders read plain AWQ; `lape_awq` + a `sparse` section for AWQ-opt."""
    config: dict[str, Any] = {
        "quant_method": "lape_awq" if sparse else "awq",
        "bits": 4,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
    if sparse:
        config["sparse"] = sparse
    return config


def config_for_model(config_dict: dict[str, Any]) -> Any:
    """The transformers config of the float model a checkpoint's config.json describes."""
    from transformers import AutoConfig

    plain = {k: v for k, v in config_dict.items() if k != "quantization_config"}
    model_type = plain.pop("model_type", None)
    if model_type is None:
        raise UserError("checkpoint config.json has no model_type")
    return AutoConfig.for_model(model_type, **plain)


def expected_layout(config: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor name the checkpoint must hold, with its shape and dtype."""
    from transformers import AutoModelForCausalLM

    qc = config["quantization_config"]
    g = qc["group_size"]
    hf_config = config_for_model(config)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    arch = architecture_of(skeleton)
    linears = quantized_linears(skeleton)
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    for name, p in skeleton.state_dict().items():
        module = name.rpartition(".")[0]
        if module not in linears and not (tied and name == "lm_head.weight"):
            layout[name] = (tuple(p.shape), torch.float16)
    for name, lin in linears.items():
        k_in, n_out = lin.in_features, lin.out_features
        if k_in % g or n_out % 8:
            raise UserError(f"{name}: shape {n_out}x{k_in} does not fit group size {g} / 8-wide packing")
        layout[f"{name}.qweight"] = ((k_in, n_out // 8), torch.int32)
        layout[f"{name}.qzeros"] = ((k_in // g, n_out // 8), torch.int32)
        layout[f"{name}.scales"] = ((k_in // g, n_out), torch.float16)
        if lin.bias is not None:
            layout[f"{name}.bias"] = ((n_out,), torch.float16)
    sparse = qc.get("sparse")
    if sparse:
        hidden = hf_config.hidden_size
        per_layer = sparse.get("neurons_per_layer", [])
        if len(per_layer) != hf_config.num_hidden_layers:
            raise UserError(
                f"sparse.neurons_per_layer has {len(per_layer)} entries, the model has "
                f"{hf_config.num_hidden_layers} layers"
            )
        for i, k in enumerate(per_layer):
            if not k:
                continue
            for proj in sparse["projections"]:
                idx_name, values_name = sparse_names(f"model.layers.{i}.{arch.mlp_linear(proj)}", arch)
                layout[idx_name] = ((k,), torch.int32)
                layout[values_name] = ((k, hidden), SPARSE_DTYPE)
    return layout


def quantized_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear the checkpoint holds as W4, keyed by its full name (`model.layers.3.mlp.down_proj`)."""
    arch = architecture_of(model)
    return {
        f"model.layers.{i}.{name}": linear
        for i, layer in enumerate(decoder_layers(model))
        for name, linear in arch.layer_linears(layer).items()
    }


def sparse_names(linear: str, arch: Architecture) -> tuple[str, str]:
    """The names of a kept-neuron linear's index and value tensors: `.sparse_idx`, `.sparse_rows|cols`."""
    return f"{linear}.sparse_idx", f"{linear}.sparse_{arch.neuron_dim(linear)}"
