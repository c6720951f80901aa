"""One call from a float model directory to a checkpoint: RTN, AWQ, GPTQ or AWQ + GPTQ, each optionally
with kept FP16 neurons (AWQ-opt and the other -opt methods), with the vocabulary in FP16 or at 8 / 4 bits
with a language's rows kept."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lape_awq.quant.architectures import architecture_of
from lape_awq.quant.awq.quantizer import QuantSpec, quantize_models
from lape_awq.quant.calibration import CalibrationSpec, calibration_batch, weighted_calibration_batch
from lape_awq.quant.checkpoint.layout import EMBEDDING, LM_HEAD, vocab_modules
from lape_awq.quant.checkpoint.writer import refuse_existing, write_checkpoint
from lape_awq.quant.errors import UserError
from lape_awq.quant.file_io import sha256_file
from lape_awq.quant.lape.kept_neurons import RULES, SENSITIVE_RULES, random_like, select_neurons
from lape_awq.quant.lape.neurons_file import NeuronsFile
from lape_awq.quant.lape.sensitivity import neuron_sensitivity
from lape_awq.quant.model_loading import config_hash, load_causal_lm
from lape_awq.quant.text_sources import builtin_text
from lape_awq.quant.vocab.quantizer import (
    VocabSpec,
    clip_importance,
    hidden_second_moment,
    quantize_vocab,
    vocab_section,
    with_kept_rows,
)
from lape_awq.quant.vocab.rows import select_rows
from lape_awq.quant.w4_math import QuantizedVocab

SENSITIVITY_SAMPLES = 8  # sequences of the kept languages' text the sensitive neuron rules score on


@dataclass(frozen=True)
class KeepSpec:
    """AWQ-opt's kept neurons: from a neurons file, for some languages, optionally capped or randomised."""

    neurons_file: Path
    langs: tuple[str, ...] = ("ko",)
    max_neurons: int | None = None
    random_control: bool = False
    seed: int = 0
    rule: str = "lape"  # how the neurons are chosen within the budget (quant/lape/kept_neurons.py RULES)

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise UserError(f"unknown neuron rule {self.rule!r} (one of {', '.join(RULES)})")


def method_name(spec: QuantSpec, keep: KeepSpec | None) -> str:
    """The spec's method (rtn, awq, gptq, awq-gptq), `-opt` with kept neurons (awq-opt, gptq-opt, ...); a
    random-neuron control gets a `-random` suffix."""
    name = spec.method + ("-opt" if keep is not None else "")
    return name + ("-random" if keep is not None and keep.random_control else "")


@dataclass(frozen=True)
class Build:
    """One checkpoint to write: where, the kept neurons of an -opt method (None: plain RTN / AWQ / GPTQ)
    and the vocabulary (None: FP16)."""

    out: Path
    keep: KeepSpec | None = None
    vocab: VocabSpec | None = None


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
    With `keep` the method is spec.method's -opt form (AWQ-opt for awq); `vocab` says how
    the embedding / LM head are stored (FP16 when None; `quantize`'s default is `default_vocab`)."""
    return quantize_checkpoints(model_dir, [Build(out, keep, vocab)], spec, calib, progress, overwrite)[0]


def quantize_checkpoints(
    model_dir: Path,
    builds: list[Build],
    spec: QuantSpec,
    calib: CalibrationSpec,
    progress: bool = True,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Write one checkpoint per build (e.g. AWQ and AWQ-opt) from one model load and one calibration: the
    vocabulary codes are searched once per vocabulary format and the decoder is quantized in one pass
    (`quantize_models`), each checkpoint exactly what `quantize_checkpoint` alone writes. Returns the
    manifests, in order."""
    outs = [build.out.resolve() for build in builds]
    if len(set(outs)) != len(outs):
        raise UserError(f"two builds write the same directory: {[str(o) for o in outs]}")
    for build in builds:
        refuse_existing(build.out, overwrite)  # before minutes of work, not after
    vocabs = [build.vocab or VocabSpec() for build in builds]
    # A bad neurons file fails fast.
    neurons = [NeuronsFile.load(b.keep.neurons_file) if b.keep is not None else None for b in builds]
    model, tokenizer = load_causal_lm(model_dir, torch.float32)
    for vocab in vocabs:
        vocab.check_fits(model.config.hidden_size)
    spec.check_fits(architecture_of(model))  # before the vocabulary's and neurons' minutes of work
    model_hash = config_hash(model.config)
    kept = [
        _kept_neurons(build.keep, nf, model_hash, model, tokenizer, spec, calib, progress)
        if build.keep is not None and nf is not None
        else None
        for build, nf in zip(builds, neurons, strict=True)
    ]
    batch, weights = weighted_calibration_batch(tokenizer, calib)
    started = time.perf_counter()
    vocab_q = quantize_models_vocab(model, tokenizer, vocabs, batch, weights)
    # Each build quantizes its own copy: the scales fold into the weights, differently where neurons are kept.
    models = [model] + [copy.deepcopy(model) for _ in builds[1:]]
    quantized = quantize_models(models, batch, spec, kept, progress, weights)
    seconds = time.perf_counter() - started
    manifests = []
    for build, vocab, copy_, linears, (matrices, section), kept_ in zip(
        builds, vocabs, models, quantized, vocab_q, kept, strict=True
    ):
        keep = build.keep
        sparse, keep_info = None, None
        if keep is not None and kept_ is not None:
            sparse = {
                "languages": list(keep.langs) if not keep.random_control else [],
                "selection": "random" if keep.random_control else "lape",
                "dtype": "float16",
                "projections": list(spec.sparse_projections),
                "neurons_per_layer": [int(k.numel()) for k in kept_],
            }
            keep_info = {
                "path": str(keep.neurons_file),
                "sha256": sha256_file(keep.neurons_file),
                **{k: v for k, v in asdict(keep).items() if k != "neurons_file"},
            }
        method = method_name(spec, keep)
        manifest = {
            "method": method,
            "source_model": {"path": str(model_dir.resolve()), "config_sha256": model_hash},
            "neurons_file": keep_info,
            "calibration": calib.record(),
            "quant_spec": spec.record(),
            "vocab_spec": asdict(vocab),
            "quantize_seconds": round(seconds, 1),
        }
        if len(builds) > 1:  # the seconds above are the shared run's
            others = [method_name(spec, b.keep) for b in builds if b is not build]
            manifest["built_together_with"] = others
        manifests.append(
            write_checkpoint(
                build.out,
                copy_,
                tokenizer,
                linears,
                spec.group_size,
                sparse,
                manifest,
                overwrite,
                matrices,
                section,
            )
        )
    return manifests


def _kept_neurons(
    keep: KeepSpec,
    nf: NeuronsFile,
    model_hash: str,
    model: torch.nn.Module,
    tokenizer: Any,
    spec: QuantSpec,
    calib: CalibrationSpec,
    progress: bool,
) -> list[torch.Tensor]:
    """Per layer, the kept FFN neurons of `keep`'s languages by its rule (or as many random ones). The
    sensitive rules score neurons on the kept languages' calibration text (the fit split, never the
    held-out one): SENSITIVITY_SAMPLES sequences of the calibration's length."""
    nf.check_made_for(model_hash, str(keep.neurons_file))
    sensitivity = None
    if keep.rule in SENSITIVE_RULES:
        text = CalibrationSpec(keep.langs, SENSITIVITY_SAMPLES, calib.seqlen, calib.seed)
        batch = calibration_batch(tokenizer, text)
        sensitivity = neuron_sensitivity(model, batch, spec.group_size, progress=progress)
    kept = select_neurons(nf, list(keep.langs), keep.rule, keep.max_neurons, sensitivity)
    return random_like(kept, nf.entropy.shape[1], keep.seed) if keep.random_control else kept


def quantize_models_vocab(
    model: torch.nn.Module,
    tokenizer: Any,
    vocabs: list[VocabSpec],
    batch: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> list[tuple[dict[str, QuantizedVocab] | None, dict[str, Any] | None]]:
    """Per vocabulary spec, the quantized vocabulary matrices (embedding, and LM head when untied) with
    their config section, or (None, None) when it stays FP16. The kept rows come from the built-in corpus's
    fit text; the clipping search weighs the LM head's error by the calibration batch's final hidden
    states (each sequence's tokens counted `weights[i]` times; None: once). Specs that differ only in kept
    rows share the codes (a row's codes do not depend on which other rows are kept)."""
    if not any(vocab.quantized for vocab in vocabs):
        return [(None, None)] * len(vocabs)
    hidden_sq = hidden_second_moment(model, batch, weights)
    modules = vocab_modules(model.config)
    codes: dict[tuple[int, int], dict[str, QuantizedVocab]] = {}
    out = []
    for vocab in vocabs:
        if not vocab.quantized:
            out.append((None, None))
            continue
        key = (vocab.bits, vocab.group_size)
        if key not in codes:
            codes[key] = {}
            for module in modules:
                roles = (module == EMBEDDING, module == LM_HEAD or len(modules) == 1)  # (embedding, LM head)
                importance = clip_importance(hidden_sq, *roles)
                codes[key][module] = quantize_vocab(
                    model.get_submodule(module).weight, vocab, None, importance
                )
        kept = None
        if vocab.keep_langs and vocab.max_rows:
            texts = [builtin_text(lang, "fit") for lang in vocab.keep_langs]
            kept = select_rows(tokenizer, texts, model.config.vocab_size, vocab.max_rows)
        matrices = {
            module: with_kept_rows(codes[key][module], model.get_submodule(module).weight, kept)
            for module in modules
        }
        out.append((matrices, vocab_section(vocab, kept, "text-frequency+script")))
    return out
