"""The neurons file: one safetensors file with LAPE's counts, scores, selection and JSON provenance."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lape_awq.quant.errors import UserError
from lape_awq.quant.file_io import atomic_file

FORMAT = "lape_awq.neurons"
FORMAT_VERSION = 1
_TENSORS = ("over_zero", "tokens", "entropy", "language_mask")


@dataclass
class NeuronsFile:
    """LAPE output for one model. Tensors: over_zero [L,N,G] int64, tokens [G] int64,
    entropy [L,N] float64 (+inf = filtered out), language_mask [G,L,N] bool."""

    languages: list[str]
    over_zero: torch.Tensor
    tokens: torch.Tensor
    entropy: torch.Tensor
    language_mask: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        g = len(self.languages)
        layers, neurons = self.entropy.shape
        expected = {
            "over_zero": (layers, neurons, g),
            "tokens": (g,),
            "language_mask": (g, layers, neurons),
        }
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise UserError(
                    f"neurons file: {name} has shape {tuple(getattr(self, name).shape)}, want {shape}"
                )

    @property
    def probs(self) -> torch.Tensor:
        """Activation probabilities [L, N, G] (float64)."""
        return self.over_zero.double() / self.tokens.double()

    @property
    def num_layers(self) -> int:
        return self.entropy.shape[0]

    def mask(self, lang: str) -> torch.Tensor:
        """[L, N] bool: the neurons specific to `lang`."""
        if lang not in self.languages:
            raise UserError(f"language {lang!r} is not in this neurons file ({', '.join(self.languages)})")
        return self.language_mask[self.languages.index(lang)]

    def neurons(self, lang: str) -> list[torch.Tensor]:
        """Per layer, the sorted int64 indices of `lang`'s neurons."""
        return [row.nonzero().flatten() for row in self.mask(lang)]

    def save(self, path: Path) -> None:
        """Write atomically (quant/file_io.py)."""
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "languages": self.languages,
            **self.metadata,
        }
        tensors = {name: getattr(self, name).contiguous() for name in _TENSORS}
        with atomic_file(path) as tmp:
            save_file(tensors, tmp, metadata={"lape_awq": json.dumps(meta)})

    def check_made_for(self, model_config_sha256: str, source: str) -> None:
        """UserError unless this file was made for the model with this config hash."""
        made_for = self.metadata.get("model", {}).get("config_sha256")
        if made_for != model_config_sha256:
            raise UserError(
                f"neurons file {source} was made for another model (config sha256 {str(made_for)[:12]}..., "
                f"this model {model_config_sha256[:12]}...): run `lape-awq neurons` on this model"
            )

    @classmethod
    def load(cls, path: Path) -> NeuronsFile:
        """Read and validate a neurons file, with one clear error for anything wrong."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"neurons file not found: {path}")
        try:
            tensors = load_file(path)
            with safe_open(path, "pt") as f:
                raw = (f.metadata() or {}).get("lape_awq")
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{path} is not a readable safetensors file: {exc}") from exc
        if raw is None:
            raise UserError(f"{path} is not a lape-awq neurons file (no lape_awq metadata)")
        meta = json.loads(raw)
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{path}: unsupported neurons file format {meta.get('format')} v{meta.get('format_version')}"
            )
        missing = [t for t in _TENSORS if t not in tensors]
        if missing:
            raise UserError(f"{path}: neurons file lacks tensor(s) {', '.join(missing)}")
        languages = meta.pop("languages")
        for key in ("format", "format_version"):
            meta.pop(key)
        return cls(languages, *(tensors[t] for t in _TENSORS), metadata=meta)
