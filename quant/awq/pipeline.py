"""One call from a float model directory to a checkpoint: RTN, AWQ or AWQ-opt."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lape_awq.quant.awq.quantizer import QuantSpec, quantize_model
from lape_awq.quant.calibration import CalibrationSpec, calibration_batch
from lape_awq.quant.checkpoint.writer import refuse_existing, write_checkpoint
from lape_awq.quant.file_io import sha256_file
from lape_awq.quant.lape.kept_neurons import language_neurons, random_like
from lape_awq.quant.lape.neurons_file import NeuronsFile
from lape_awq.quant.model_loading import config_hash, load_causal_lm


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
) -> dict[str, Any]:
    """Quantize the model in `model_dir` and write the checkpoint to `out`; returns its manifest.
    With `keep` the method is AWQ-opt (or RTN + kept neurons when spec.method is rtn)."""
    method = method_name(spec, keep)
    refuse_existing(out, overwrite)  # before minutes of work, not after
    nf = NeuronsFile.load(keep.neurons_file) if keep is not None else None  # a bad file fails fast
    model, tokenizer = load_causal_lm(model_dir, torch.float32)
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
        "quantize_seconds": round(seconds, 1),
    }
    return write_checkpoint(out, model, tokenizer, quantized, spec.group_size, sparse, manifest, overwrite)
