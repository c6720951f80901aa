"""The checkpoint's layout: file names, the quantization_config written to config.json, and every tensor a
checkpoint of a given config must hold (docs/checkpoint-format.md).

Plain AWQ is AutoAWQ's "gemm" layout (`quant_method: awq`); AWQ-opt adds sparse tensors to the MLP
linears, and a quantized vocabulary replaces the embedding / LM head by codes (both `quant_method:
lape_awq`, which stock AWQ loaders cannot read).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lape_awq.kernels.vocab_codes import VOCAB_BITS, packed_width
from lape_awq.quant.architectures import Architecture, architecture_of, decoder_layers
from lape_awq.quant.errors import UserError

WEIGHTS = "model.safetensors"
MANIFEST = "lape_awq_manifest.json"
QUANT_METHODS = ("awq", "lape_awq")
SPARSE_DTYPE = torch.float16
GROUP_SIZES = (32, 64, 128)
EMBEDDING = "model.embed_tokens"
LM_HEAD = "lm_head"


def quantization_config(
    group_size: int, sparse: dict[str, Any] | None, vocab: dict[str, Any] | None = None
) -> dict[str, Any]:
    """AutoAWQ's keys, so stock loaders read plain AWQ; `lape_awq` + a `sparse` section for AWQ-opt and a
    `vocab` section for a quantized vocabulary."""
    config: dict[str, Any] = {
        "quant_method": "lape_awq" if sparse or vocab else "awq",
        "bits": 4,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
    if sparse:
        config["sparse"] = sparse
    if vocab:
        config["vocab"] = vocab
    return config


def vocab_modules(hf_config: Any) -> tuple[str, ...]:
    """The vocabulary matrices a quantized vocabulary replaces: the embedding, and the LM head when untied."""
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    return (EMBEDDING,) if tied else (EMBEDDING, LM_HEAD)


def check_vocab_section(vocab: Any) -> None:
    """The `vocab` section's own fields (what needs no model config); a bad one is a UserError."""
    if not isinstance(vocab, dict):
        raise UserError("quantization_config.vocab must be an object")
    bits, g, kept = vocab.get("bits"), vocab.get("group_size"), vocab.get("kept_rows", 0)
    if bits not in VOCAB_BITS:
        raise UserError(f"vocab.bits must be 4 or 8, got {bits!r}")
    if g not in GROUP_SIZES:
        raise UserError(f"vocab.group_size must be 32, 64 or 128, got {g!r}")
    if isinstance(kept, bool) or not isinstance(kept, int) or kept < 0:
        raise UserError(f"vocab.kept_rows must be a non-negative integer, got {kept!r}")


def vocab_layout(
    module: str, vocab: dict[str, Any], vocab_size: int, hidden: int
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors of one quantized vocabulary matrix (kernels/vocab_codes.py), kept rows included."""
    check_vocab_section(vocab)
    bits, g, kept = vocab["bits"], vocab["group_size"], vocab.get("kept_rows", 0)
    if hidden % g:
        raise UserError(f"vocab.group_size {g} does not divide the hidden size {hidden}")
    if kept > vocab_size:
        raise UserError(f"vocab.kept_rows {kept} exceeds the vocabulary size {vocab_size}")
    layout = {
        f"{module}.qweight": ((vocab_size, packed_width(hidden, bits)), torch.uint8),
        f"{module}.qzeros": ((vocab_size, hidden // g), torch.uint8),
        f"{module}.scales": ((vocab_size, hidden // g), torch.float16),
    }
    if kept:
        layout[f"{module}.sparse_idx"] = ((kept,), torch.int32)
        layout[f"{module}.sparse_rows"] = ((kept, hidden), SPARSE_DTYPE)
    return layout


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
    vocab = qc.get("vocab")
    replaced = set(linears) | (set(vocab_modules(hf_config)) if vocab else set())
    for name, p in skeleton.state_dict().items():
        module = name.rpartition(".")[0]
        if module not in replaced and not (tied and name == "lm_head.weight"):
            layout[name] = (tuple(p.shape), torch.float16)
    if vocab:
        for module in vocab_modules(hf_config):
            layout.update(vocab_layout(module, vocab, hf_config.vocab_size, hf_config.hidden_size))
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
