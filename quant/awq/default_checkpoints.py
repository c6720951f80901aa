"""The default model's AWQ and AWQ-opt checkpoints, built with `quantize`'s defaults when missing."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lape_awq.quant.paths import home_dir

DEFAULT_METHODS = ("awq", "awq-opt")


def checkpoint_path(model_dir: Path, method: str) -> Path:
    """Where `lape-awq quantize --method METHOD` writes when no --out is given."""
    return home_dir() / "checkpoints" / f"{model_dir.name}-{method}"


def ensure_neurons_file(model_dir: Path, progress: bool = True) -> Path:
    """The model's default neurons file, made with default LAPE settings if it does not exist yet."""
    from lape_awq.quant.lape.job import default_neurons_path, find_and_save_neurons

    path = default_neurons_path(model_dir)
    if not path.is_file():
        find_and_save_neurons(model_dir, path, progress=progress)
    return path


def _as_json(value: Any) -> Any:
    """`value` as a manifest stores it (tuples become lists)."""
    return json.loads(json.dumps(value))


def stale_reason(out: Path, recipe: dict[str, Any], neurons: Path | None) -> str | None:
    """Why the checkpoint at `out` is not the current default recipe's (None when it is)."""
    from lape_awq.quant.checkpoint.layout import MANIFEST
    from lape_awq.quant.file_io import sha256_file

    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"it has no readable {MANIFEST}"
    for key, wanted in recipe.items():
        if manifest.get(key) != _as_json(wanted):
            return f"its {key} is {manifest.get(key)} where the default recipe has {_as_json(wanted)}"
    if neurons is not None and (manifest.get("neurons_file") or {}).get("sha256") != sha256_file(neurons):
        return f"it was built from other neurons than {neurons}"
    return None


def ensure_default_checkpoint(method: str, progress: bool = True) -> Path:
    """The embedded default model quantized with `method` (awq or awq-opt) by the current default recipe:
    built once, then reused; one built by an earlier recipe (or from other neurons) is rebuilt."""
    return ensure_default_checkpoints((method,), progress)[method]


def ensure_default_checkpoints(
    methods: tuple[str, ...] = DEFAULT_METHODS, progress: bool = True
) -> dict[str, Path]:
    """`ensure_default_checkpoint` for several methods; those to build are built together (one model load
    and calibration, the searches they share run once: `quantize_checkpoints`)."""
    from lape_awq.quant.awq.pipeline import Build, KeepSpec, quantize_checkpoints
    from lape_awq.quant.awq.quantizer import QuantSpec
    from lape_awq.quant.calibration import CalibrationSpec
    from lape_awq.quant.checkpoint.reader import read_checkpoint
    from lape_awq.quant.default_model import prepare_default_model
    from lape_awq.quant.vocab.quantizer import default_vocab

    unknown = [m for m in methods if m not in DEFAULT_METHODS]
    if unknown:
        raise ValueError(f"methods must be among {DEFAULT_METHODS}, got {unknown}")
    model_dir = prepare_default_model()
    spec, calib = QuantSpec("awq"), CalibrationSpec()
    paths, builds = {}, []
    for method in methods:
        out = paths[method] = checkpoint_path(model_dir, method)
        keep = KeepSpec(ensure_neurons_file(model_dir, progress)) if method == "awq-opt" else None
        vocab = default_vocab(keep.langs if keep is not None else ())
        if (out / "config.json").is_file():
            recipe = {"method": method, "quant_spec": spec.record(), "calibration": calib.record()}
            stale = stale_reason(out, {**recipe, "vocab_spec": asdict(vocab)}, keep and keep.neurons_file)
            if stale is None:
                read_checkpoint(out)  # a damaged checkpoint is refused here, not by a half-started engine
                continue
            print(f"rebuilding {out}: {stale}", file=sys.stderr, flush=True)
        builds.append(Build(out, keep, vocab))
    if builds:
        quantize_checkpoints(model_dir, builds, spec, calib, progress, overwrite=True)
    return paths
