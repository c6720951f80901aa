"""Model directory -> neurons file: load, run LAPE, record provenance, save atomically."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lape_awq.quant.lape.finder import SamplingSettings, find_language_neurons, require_languages
from lape_awq.quant.lape.neurons_file import NeuronsFile
from lape_awq.quant.lape.selection import LapeOptions
from lape_awq.quant.model_loading import config_hash, load_causal_lm, pick_dtype
from lape_awq.quant.paths import home_dir
from lape_awq.quant.text_sources import DEFAULT_LANGUAGES, LanguageText, language_texts


def default_neurons_path(model_dir: Path) -> Path:
    return home_dir() / "neurons" / f"{model_dir.name}.neurons.safetensors"


def find_and_save_neurons(
    model_dir: Path,
    out: Path,
    texts: list[LanguageText] | None = None,
    options: LapeOptions | None = None,
    sampling: SamplingSettings | None = None,
    dtype: str = "auto",
    progress: bool = True,
) -> tuple[NeuronsFile, float]:
    """Run LAPE on the model (default: the 8 built-in languages) and write `out`; returns the file and
    the seconds LAPE itself took."""
    texts = texts if texts is not None else language_texts(list(DEFAULT_LANGUAGES), {})
    require_languages([t.lang for t in texts])
    options, sampling = options or LapeOptions(), sampling or SamplingSettings()
    torch_dtype = pick_dtype(dtype)
    model, tokenizer = load_causal_lm(model_dir, torch_dtype)
    started = time.perf_counter()
    result = find_language_neurons(model, tokenizer, texts, options, sampling, progress=progress)
    seconds = time.perf_counter() - started
    metadata = {
        "model": {
            "path": str(model_dir.resolve()),
            "architecture": type(model).__name__,
            "config_sha256": config_hash(model.config),
        },
        "texts": {t.lang: t.describe() for t in texts},
        "options": vars(options),
        "sampling": vars(sampling),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "thresholds": {
            "filter": result.selection.filter_threshold,
            "activation_bar": result.selection.activation_bar,
        },
        "torch": torch.__version__,
    }
    sel = result.selection
    nf = NeuronsFile(
        result.languages, result.over_zero, result.tokens, sel.entropy, sel.language_mask, metadata
    )
    nf.save(out)
    return nf, seconds
