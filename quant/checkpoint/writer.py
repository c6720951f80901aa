"""Write a checkpoint directory atomically: fp16 for what stays dense, W4 + sparse FP16 for the quantized
linears, codes + kept rows for a quantized vocabulary, config.json with the quantization_config, the
tokenizer, and a manifest with sizes and hashes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lape_awq.kernels.vocab_codes import pack_codes
from lape_awq.quant.architectures import architecture_of
from lape_awq.quant.checkpoint.layout import (
    MANIFEST,
    SPARSE_DTYPE,
    WEIGHTS,
    quantization_config,
    sparse_names,
    vocab_modules,
)
from lape_awq.quant.checkpoint.torch_reference import W4Linear
from lape_awq.quant.errors import UserError
from lape_awq.quant.file_io import atomic_directory, sha256_file
from lape_awq.quant.provenance import tool_stamp
from lape_awq.quant.w4_math import QuantizedLinear, QuantizedVocab


def refuse_existing(out: Path, overwrite: bool) -> None:
    """Checkpoints are never overwritten by accident."""
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists: choose another --out, or pass --overwrite")


def vocab_tensors(module: str, q: QuantizedVocab) -> dict[str, torch.Tensor]:
    """One quantized vocabulary matrix in the checkpoint's form (kernels/vocab_codes.py)."""
    tensors = {
        f"{module}.qweight": pack_codes(q.quant.codes, q.bits),
        f"{module}.qzeros": q.quant.zeros.to(torch.uint8).contiguous(),
        f"{module}.scales": q.quant.scales.half().contiguous(),
    }
    if q.sparse_idx is not None and q.sparse_idx.numel():
        tensors[f"{module}.sparse_idx"] = q.sparse_idx.to(torch.int32).contiguous()
        tensors[f"{module}.sparse_rows"] = q.sparse.to(SPARSE_DTYPE).contiguous()
    return tensors


def checkpoint_tensors(
    model: nn.Module,
    quantized: dict[str, QuantizedLinear],
    vocab: dict[str, QuantizedVocab] | None = None,
) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint: fp16 for what stays dense, W4 + sparse for the quantized linears,
    codes + kept rows for the vocabulary matrices in `vocab` (keyed by module: embedding, LM head)."""
    arch = architecture_of(model)
    tensors: dict[str, torch.Tensor] = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    vocab = vocab or {}
    if vocab and set(vocab) != set(vocab_modules(model.config)):
        raise UserError(
            f"a quantized vocabulary needs {', '.join(vocab_modules(model.config))}, got {', '.join(vocab)}"
        )
    for name, p in model.state_dict().items():
        module = name.rpartition(".")[0]
        if module in quantized or module in vocab or (tied and name == "lm_head.weight"):
            continue
        tensors[name] = p.detach().to(torch.float16).contiguous()
    for module, q in vocab.items():
        tensors.update(vocab_tensors(module, q))
    for name, q in quantized.items():
        kind = arch.neuron_dim(name) if q.sparse is not None else None
        m = W4Linear.from_quantized(q, kind)
        tensors[f"{name}.qweight"] = m.qweight
        tensors[f"{name}.qzeros"] = m.qzeros
        tensors[f"{name}.scales"] = m.scales
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias
        if m.sparse is not None:
            idx_name, values_name = sparse_names(name, arch)
            tensors[idx_name] = m.sparse_idx
            tensors[values_name] = m.sparse.to(SPARSE_DTYPE).contiguous()
    return tensors


def write_checkpoint(
    out: Path,
    model: nn.Module,
    tokenizer: Any,
    quantized: dict[str, QuantizedLinear],
    group_size: int,
    sparse: dict[str, Any] | None,
    manifest: dict[str, Any],
    overwrite: bool = False,
    vocab: dict[str, QuantizedVocab] | None = None,
    vocab_section: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the checkpoint directory atomically; returns the manifest written (with sizes and hashes).
    An existing `out` is refused, or with `overwrite` replaced only once the new one is complete.
    `vocab` (the quantized vocabulary matrices) comes with its `vocab_section` of the quantization_config."""
    refuse_existing(out, overwrite)
    if bool(vocab) != bool(vocab_section):
        raise ValueError("a quantized vocabulary needs both its tensors and its quantization_config section")
    tensors = checkpoint_tensors(model, quantized, vocab)
    size = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    # `.sparse_*` tensors: the MLPs' kept neurons, or (under a vocabulary module) the kept rows.
    kept_rows_bytes = sum(
        n for name, n in size.items() if ".sparse_" in name and name.rpartition(".")[0] in (vocab or {})
    )
    sparse_bytes = sum(n for name, n in size.items() if ".sparse_" in name) - kept_rows_bytes
    total_bytes = sum(size.values())
    config = model.config.to_dict()
    # A model built from a config alone has no `architectures`; loaders (vLLM) pick the class from it.
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    config["quantization_config"] = quantization_config(group_size, sparse, vocab_section)
    config["torch_dtype"] = "float16"
    config.pop("dtype", None)
    with atomic_directory(out, replace=overwrite) as tmp:
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest = {
            **tool_stamp(),
            **manifest,
            "sizes": {
                "total_bytes": total_bytes,
                "sparse_bytes": sparse_bytes,
                "sparse_fraction": sparse_bytes / max(total_bytes - sparse_bytes, 1),
                "kept_rows_bytes": kept_rows_bytes,
                "kept_rows_fraction": kept_rows_bytes / max(total_bytes - kept_rows_bytes, 1),
            },
            "files": {WEIGHTS: sha256_file(tmp / WEIGHTS)},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
