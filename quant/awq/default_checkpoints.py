"""The default model's AWQ and AWQ-opt checkpoints, built with `quantize`'s defaults when missing."""

from __future__ import annotations

from pathlib import Path

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


def ensure_default_checkpoint(method: str, progress: bool = True) -> Path:
    """The embedded default model quantized with `method` (awq or awq-opt): built once, then reused."""
    from lape_awq.quant.awq.pipeline import KeepSpec, quantize_checkpoint
    from lape_awq.quant.awq.quantizer import QuantSpec
    from lape_awq.quant.calibration import CalibrationSpec
    from lape_awq.quant.checkpoint.reader import read_checkpoint
    from lape_awq.quant.default_model import prepare_default_model
    from lape_awq.quant.vocab.quantizer import default_vocab

    if method not in DEFAULT_METHODS:
        raise ValueError(f"method must be one of {DEFAULT_METHODS}, got {method!r}")
    model_dir = prepare_default_model()
    out = checkpoint_path(model_dir, method)
    if (out / "config.json").is_file():
        read_checkpoint(out)  # a damaged checkpoint is refused here, not by a half-started engine
        return out
    keep = KeepSpec(ensure_neurons_file(model_dir, progress)) if method == "awq-opt" else None
    vocab = default_vocab(keep.langs if keep is not None else ())
    quantize_checkpoint(model_dir, out, QuantSpec("awq"), CalibrationSpec(), keep, progress, vocab=vocab)
    return out
