"""The checkpoints an evaluation compares: loaded through the torch reference, after checking each was
made from the float model it is compared with."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from lape_awq.quant.checkpoint.layout import MANIFEST
from lape_awq.quant.checkpoint.torch_reference import load_quantized_model
from lape_awq.quant.errors import UserError
from lape_awq.quant.model_loading import config_hash

# Config fields that must agree for a checkpoint to be the float model's (besides the model class).
_SAME_MODEL_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")


def check_checkpoint_model(path: Path, fp_model: nn.Module, q_model: nn.Module) -> None:
    """Refuse a checkpoint of another architecture, vocabulary or shape than the float model."""
    fp_arch, q_arch = type(fp_model).__name__, type(q_model).__name__
    if fp_arch != q_arch:
        raise UserError(f"checkpoint {path} is a {q_arch}, the model is a {fp_arch}")
    for key in _SAME_MODEL_FIELDS:
        fp_v, q_v = getattr(fp_model.config, key, None), getattr(q_model.config, key, None)
        if fp_v != q_v:
            raise UserError(f"checkpoint {path} has {key} {q_v}, the model has {fp_v}: not made from it")


def check_manifest(path: Path, fp_config_hash: str) -> None:
    """Where the checkpoint records its source model, it must be this model's config."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return
    try:
        source = json.loads(manifest_path.read_text()).get("source_model") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise UserError(f"{manifest_path} is not a valid manifest: {exc}") from exc
    recorded = source.get("config_sha256")
    if recorded is not None and recorded != fp_config_hash:
        raise UserError(
            f"checkpoint {path} was quantized from another model ({source.get('path', 'unknown path')}, "
            f"config sha256 {recorded[:12]}, --model has {fp_config_hash[:12]})"
        )


def load_checkpoints(paths: Mapping[str, Path], fp_model: nn.Module) -> dict[str, nn.Module]:
    """Load each checkpoint (float32, torch reference kernels) after checking it belongs to `fp_model`."""
    fp_hash = config_hash(fp_model.config)
    models: dict[str, nn.Module] = {}
    for name, path in paths.items():
        if not Path(path).is_dir():
            raise UserError(f"checkpoint directory not found: {path}")
        check_manifest(Path(path), fp_hash)
        model = load_quantized_model(Path(path), torch.float32)
        check_checkpoint_model(Path(path), fp_model, model)
        models[name] = model.to(next(fp_model.parameters()).device)
    return models
