"""Find, validate and load a local HF causal LM (one of the architecture table's); fingerprint its config."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from lape_awq.quant.architectures import SUPPORTED, architecture_of
from lape_awq.quant.errors import UserError

# Keys that change with tooling, not with the network the config describes.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "_commit_hash"}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_dir(model: str | Path | None) -> Path:
    """`None` means the embedded default model (prepared on first use); else a checked local directory."""
    if model is None:
        from lape_awq.quant.default_model import prepare_default_model

        return prepare_default_model()
    path = Path(model).expanduser()
    if not path.exists():
        raise UserError(f"model directory not found: {path}")
    if not path.is_dir():
        raise UserError(f"--model must be a directory holding an HF model, got a file: {path}")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a Hugging Face model directory (no config.json)")
    return path


def config_hash(config: object) -> str:
    """sha256 of the config's architecture-defining fields, stable across tooling versions."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)  # type: ignore[call-overload]
    data = {k: v for k, v in data.items() if k not in _VOLATILE_CONFIG_KEYS}
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def pick_dtype(name: str) -> torch.dtype:
    """'auto' is bfloat16 where the CPU has native bf16 (2x faster here, same signs), else float32."""
    if name == "auto":
        cpu_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        if torch.cuda.is_available() or cpu_bf16:
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_causal_lm(path: Path, dtype: torch.dtype) -> tuple[nn.Module, object]:
    """Load model (eval mode) and tokenizer from a local directory, with one-line errors."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises several types for unknown or broken configs
        raise UserError(f"cannot read the model config in {path}: {_first_line(exc)}") from exc
    try:
        # Weightless skeleton first: an unsupported layout is refused before any weight is read.
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise UserError(
            f"{path}: model type {config.model_type!r} is not a causal LM transformers can load "
            f"(supported: {SUPPORTED})"
        ) from exc
    architecture_of(skeleton)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, local_files_only=True)
    except OSError as exc:
        raise UserError(f"cannot load the weights in {path}: {_first_line(exc)}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise UserError(f"cannot load the tokenizer in {path}: {_first_line(exc)}") from exc
    model.eval()
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
