"""One call from a float model directory to a checkpoint: RTN, AWQ or AWQ-opt, with the vocabulary in FP16
or at 8 / 4 bits with a language's rows kept."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lape_awq.quant.awq.quantizer import QuantSpec, quantize_model
from lape_awq.quant.calibration import CalibrationSpec, calibration_batch
from lape_awq.quant.checkpoint.layout import EMBEDDING, LM_HEAD, vocab_modules
from lape_awq.quant.checkpoint.writer import refuse_existing, write_checkpoint
from lape_awq.quant.file_io import sha256_file
from lape_awq.quant.lape.kept_neurons import language_neurons, random_like
from lape_awq.quant.lape.neurons_file import NeuronsFile
from lape_awq.quant.model_loading import config_hash, load_causal_lm
from lape_awq.quant.text_sources import builtin_text
from lape_awq.quant.vocab.quantizer import (
    VocabSpec,
    clip_importance,
    hidden_second_moment,
    quantize_vocab,
    vocab_section,
)
from lape_awq.quant.vocab.rows import select_rows
from lape_awq.quant.w4_math import QuantizedVocab


@dataclass(frozen=True)
class KeepSpec:
    """AWQ-opt's kept neurons: from a neurons file, for some languages, optionally capped or randomised."""

    neurons_file: Path
    langs: tuple[str, ...] = ("ko",)
    max_neurons: int | None = None
    random_control: bool = False
    seed: int = 0


def method_name(spec: QuantSpec, keep: KeepSpec | None) -> str:
    """rtn, awq, awq-opt (or rtn-opt); a random-neuron control gets a `-random` suffix."""
    name = spec.method + ("-opt" if keep is not None else "")
    return name + ("-random" if keep is not None and keep.random_control else "")


def quantize_checkpoint(
    model_dir: Path,
    out: Path,
    spec: QuantSpec,
    calib: CalibrationSpec,
    keep: KeepSpec | None = None,
    progress: bool = True,
    overwrite: bool = False,
    vocab: VocabSpec | None = None,
) -> dict[str, Any]:
    """Quantize the model in `model_dir` and write the checkpoint to `out`; returns its manifest.
    With `keep` the method is AWQ-opt (or RTN + kept neurons when spec.method is rtn); `vocab` says how
    the embedding / LM head are stored (FP16 when None; `quantize`'s default is `default_vocab`)."""
    method = method_name(spec, keep)
    vocab = vocab or VocabSpec()
    refuse_existing(out, overwrite)  # before minutes of work, not after
    nf = NeuronsFile.load(keep.neurons_file) if keep is not None else None  # a bad file fails fast
    model, tokenizer = load_causal_lm(model_dir, torch.float32)
    vocab.check_fits(model.config.hidden_size)
    model_hash = config_hash(model.config)
    kept, keep_info = None, None
    if keep is not None and nf is not None:
        nf.check_made_for(model_hash, str(keep.neurons_file))
        kept = language_neurons(nf, list(keep.langs), keep.max_neurons)
        if keep.random_control:
            kept = random_like(kept, nf.entropy.shape[1], keep.seed)
        keep_info = {
            "path": str(keep.neurons_file),
            "sha256": sha256_file(keep.neurons_file),
            **{k: v for k, v in asdict(keep).items() if k != "neurons_file"},
        }
    batch = calibration_batch(tokenizer, calib)
    started = time.perf_counter()
    vocab_q, section = quantize_model_vocab(model, tokenizer, vocab, batch)
    quantized = quantize_model(model, batch, spec, kept, progress)
    seconds = time.perf_counter() - started
    sparse = None
    if kept is not None:
        sparse = {
            "languages": list(keep.langs) if not keep.random_control else [],
            "selection": "random" if keep.random_control else "lape",
            "dtype": "float16",
            "projections": list(spec.sparse_projections),
            "neurons_per_layer": [int(k.numel()) for k in kept],
        }
    manifest = {
        "method": method,
        "source_model": {"path": str(model_dir.resolve()), "config_sha256": model_hash},
        "neurons_file": keep_info,
        "calibration": asdict(calib),
        "quant_spec": asdict(spec),
        "vocab_spec": asdict(vocab),
        "quantize_seconds": round(seconds, 1),
    }
    return write_checkpoint(
        out, model, tokenizer, quantized, spec.group_size, sparse, manifest, overwrite, vocab_q, section
    )


def quantize_model_vocab(
    model: torch.nn.Module, tokenizer: Any, vocab: VocabSpec, batch: torch.Tensor
) -> tuple[dict[str, QuantizedVocab] | None, dict[str, Any] | None]:
    """The quantized vocabulary matrices (embedding, and LM head when untied) with their config section, or
    (None, None) when the vocabulary stays FP16. The kept rows come from the built-in corpus's fit text;
    the clipping search weighs the LM head's error by the calibration batch's final hidden states."""
    if not vocab.quantized:
        return None, None
    kept = None
    if vocab.keep_langs and vocab.max_rows:
        texts = [builtin_text(lang, "fit") for lang in vocab.keep_langs]
        kept = select_rows(tokenizer, texts, model.config.vocab_size, vocab.max_rows)
    hidden_sq = hidden_second_moment(model, batch)
    modules = vocab_modules(model.config)
    matrices = {}
    for module in modules:
        roles = (module == EMBEDDING, module == LM_HEAD or len(modules) == 1)  # (embedding, LM head)
        importance = clip_importance(hidden_sq, *roles)
        matrices[module] = quantize_vocab(model.get_submodule(module).weight, vocab, kept, importance)
    return matrices, vocab_section(vocab, kept, "text-frequency+script")
