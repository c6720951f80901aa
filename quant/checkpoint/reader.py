"""Read a checkpoint and validate it strictly: config, hashes, and every tensor's name, shape, dtype and
values against the layout; any problem is one UserError naming what is wrong."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lape_awq.kernels.sparse_correction import check_sparse_indices
from lape_awq.quant.checkpoint.layout import (
    GROUP_SIZES,
    MANIFEST,
    QUANT_METHODS,
    WEIGHTS,
    config_for_model,
    expected_layout,
    vocab_modules,
)
from lape_awq.quant.errors import UserError
from lape_awq.quant.file_io import sha256_file


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load config and tensors and validate them; any problem is one UserError naming what is wrong."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a checkpoint directory (no config.json)")
    config = json.loads((path / "config.json").read_text())
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") not in QUANT_METHODS:
        raise UserError(f"{path}: config.json has no awq / lape_awq quantization_config")
    if qc.get("bits") != 4 or qc.get("group_size") not in GROUP_SIZES or qc.get("version") != "gemm":
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


def _validate_tensors(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    layout = expected_layout(config)
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
    hf_config = config_for_model(config)
    vocab = config["quantization_config"].get("vocab")
    vocab_tensors = vocab_modules(hf_config) if vocab else ()
    for name, t in tensors.items():
        module = name.rpartition(".")[0]
        if name.endswith(".sparse_idx"):
            # Kept FFN neurons index the MLP's intermediate channels; kept vocabulary rows index tokens.
            size = hf_config.vocab_size if module in vocab_tensors else hf_config.intermediate_size
            try:
                check_sparse_indices(t, size, f"tensor {name}")
            except ValueError as exc:
                raise UserError(str(exc)) from None
        elif module in vocab_tensors and name.endswith(".qzeros") and int(t.max()) >= 2 ** vocab["bits"]:
            raise UserError(f"tensor {name} holds zero points above {2 ** vocab['bits'] - 1}")
