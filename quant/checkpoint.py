"""The W4 (+ sparse FP16) checkpoint: write atomically, validate strictly, load into transformers.

Format: docs/checkpoint-format.md. Plain AWQ is AutoAWQ's "gemm" layout (`quant_method: awq`);
AWQ-opt adds sparse tensors to the MLP linears (`quant_method: lape_awq`).
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lape_awq.quant.atomic_dir import atomic_directory
from lape_awq.quant.errors import UserError
from lape_awq.quant.model_loading import decoder_layers
from lape_awq.quant.quantizer import QuantizedLinear, layer_linears
from lape_awq.quant.w4_modules import W4Linear, sparse_kind

WEIGHTS = "model.safetensors"
MANIFEST = "lape_awq_manifest.json"
QUANT_METHODS = ("awq", "lape_awq")
SPARSE_DTYPE = torch.float16


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def refuse_existing(out: Path, overwrite: bool) -> None:
    """Checkpoints are never overwritten by accident."""
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists: choose another --out, or pass --overwrite")


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


def checkpoint_tensors(model: nn.Module, quantized: dict[str, QuantizedLinear]) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint: fp16 for what stays dense, W4 + sparse for the quantized linears."""
    tensors: dict[str, torch.Tensor] = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, p in model.state_dict().items():
        module = name.rpartition(".")[0]
        if module in quantized or (tied and name == "lm_head.weight"):
            continue
        tensors[name] = p.detach().to(torch.float16).contiguous()
    for name, q in quantized.items():
        kind = sparse_kind(name)
        m = W4Linear.from_quantized(q, kind)
        tensors[f"{name}.qweight"] = m.qweight
        tensors[f"{name}.qzeros"] = m.qzeros
        tensors[f"{name}.scales"] = m.scales
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias
        if m.sparse is not None:
            tensors[f"{name}.sparse_idx"] = m.sparse_idx
            tensors[f"{name}.sparse_{kind}"] = m.sparse.to(SPARSE_DTYPE).contiguous()
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
) -> dict[str, Any]:
    """Write the checkpoint directory atomically; returns the manifest written (with sizes and hashes).
    An existing `out` is refused, or with `overwrite` replaced only once the new one is complete."""
    refuse_existing(out, overwrite)
    tensors = checkpoint_tensors(model, quantized)
    sparse_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if ".sparse_" in k)
    total_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    config = model.config.to_dict()
    # A model built from a config alone has no `architectures`; loaders (vLLM) pick the class from it.
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    config["quantization_config"] = quantization_config(group_size, sparse)
    config["torch_dtype"] = "float16"
    config.pop("dtype", None)
    with atomic_directory(out, replace=overwrite) as tmp:
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest = {
            "tool": "lape-awq",
            "tool_version": version("lape-awq"),
            **manifest,
            "sizes": {
                "total_bytes": total_bytes,
                "sparse_bytes": sparse_bytes,
                "sparse_fraction": sparse_bytes / max(total_bytes - sparse_bytes, 1),
            },
            "files": {WEIGHTS: sha256_file(tmp / WEIGHTS)},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _config_for_model(config_dict: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    plain = {k: v for k, v in config_dict.items() if k != "quantization_config"}
    model_type = plain.pop("model_type", None)
    if model_type is None:
        raise UserError("checkpoint config.json has no model_type")
    return AutoConfig.for_model(model_type, **plain)


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load config and tensors and validate them; any problem is one UserError naming what is wrong."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a checkpoint directory (no config.json)")
    config = json.loads((path / "config.json").read_text())
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") not in QUANT_METHODS:
        raise UserError(f"{path}: config.json has no awq / lape_awq quantization_config")
    if qc.get("bits") != 4 or qc.get("group_size") not in (32, 64, 128) or qc.get("version") != "gemm":
        raise UserError(
            f"{path}: unsupported quantization (bits {qc.get('bits')}, group size {qc.get('group_size')})"
        )
    weights = path / WEIGHTS
    if not weights.is_file():
        raise UserError(f"{path}: missing {WEIGHTS}")
    manifest_path = path / MANIFEST
    if manifest_path.is_file():
        expected = json.loads(manifest_path.read_text()).get("files", {}).get(WEIGHTS)
        if expected is not None and sha256_file(weights) != expected:
            raise UserError(
                f"{path}: {WEIGHTS} hash mismatch (sha256 differs from {MANIFEST}); the file was changed"
            )
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path}: {WEIGHTS} is not readable: {exc}") from exc
    _validate_tensors(config, tensors)
    return config, tensors


def _expected_layout(config: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor name the checkpoint must hold, with its shape and dtype."""
    from transformers import AutoModelForCausalLM

    qc = config["quantization_config"]
    g = qc["group_size"]
    hf_config = _config_for_model(config)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    linears = {
        f"model.layers.{i}.{name}": lin
        for i, layer in enumerate(decoder_layers(skeleton))
        for name, lin in layer_linears(layer).items()
    }
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
            raise UserError(f"sparse.neurons_per_layer has {len(per_layer)} entries, the model has "
                            f"{hf_config.num_hidden_layers} layers")  # fmt: skip
        for i, k in enumerate(per_layer):
            if not k:
                continue
            for proj in sparse["projections"]:
                layout[f"model.layers.{i}.mlp.{proj}.sparse_idx"] = ((k,), torch.int32)
                layout[f"model.layers.{i}.mlp.{proj}.sparse_{sparse_kind(proj)}"] = (
                    (k, hidden),
                    SPARSE_DTYPE,
                )
    return layout


def _validate_tensors(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    layout = _expected_layout(config)
    for name, (shape, dtype) in layout.items():
        t = tensors.get(name)
        if t is None:
            raise UserError(f"checkpoint is missing tensor {name}")
        if tuple(t.shape) != shape:
            raise UserError(f"tensor {name} has shape {tuple(t.shape)}, expected {shape}")
        if t.dtype != dtype:
            raise UserError(f"tensor {name} has dtype {t.dtype}, expected {dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"tensor {name} holds NaN or Inf values")
    extra = sorted(set(tensors) - set(layout))
    if extra:
        raise UserError(
            f"checkpoint has unexpected tensor {extra[0]}"
            + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    intermediate = _config_for_model(config).intermediate_size
    for name, t in tensors.items():
        if name.endswith(".sparse_idx"):
            idx = t.long()
            if idx.numel() and (idx.min() < 0 or idx.max() >= intermediate):
                raise UserError(f"tensor {name} has indices outside [0, {intermediate})")
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise UserError(f"tensor {name} is not strictly increasing (sorted, no duplicates)")


def load_quantized_model(path: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers model running the checkpoint through W4Linear (the torch reference)."""
    from transformers import AutoModelForCausalLM

    config, tensors = read_checkpoint(path)
    qc = config["quantization_config"]
    hf_config = _config_for_model(config)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    sparse = qc.get("sparse") or {}
    projections = set(sparse.get("projections", ()))
    per_layer = sparse.get("neurons_per_layer", [])
    for i, layer in enumerate(decoder_layers(model)):
        for name, lin in layer_linears(layer).items():
            part, n = name.split(".")
            prefix = f"model.layers.{i}.{name}"
            k = per_layer[i] if per_layer and part == "mlp" and n in projections else 0
            kind = sparse_kind(n) if k else None
            w4 = W4Linear(lin.in_features, lin.out_features, qc["group_size"], lin.bias is not None, k, kind)
            w4.qweight.copy_(tensors.pop(f"{prefix}.qweight"))
            w4.qzeros.copy_(tensors.pop(f"{prefix}.qzeros"))
            w4.scales.copy_(tensors.pop(f"{prefix}.scales"))
            if lin.bias is not None:
                w4.bias.copy_(tensors.pop(f"{prefix}.bias"))
            if k:
                w4.sparse_idx.copy_(tensors.pop(f"{prefix}.sparse_idx"))
                w4.sparse.copy_(tensors.pop(f"{prefix}.sparse_{kind}"))
            setattr(getattr(layer, part), n, w4.to(lin.weight.device))
    filled = {
        f"{name}.{b}"
        for name, m in model.named_modules()
        if isinstance(m, W4Linear)
        for b, _ in m.named_buffers()
    }
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
        filled.add("lm_head.weight")
    missing = sorted(set(missing) - filled)
    if missing or unexpected:
        raise UserError(
            f"{path}: checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.eval()
