"""Calibration token sequences: a language mix from the built-in corpus's fit split, or user files."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lape_awq.quant.errors import UserError
from lape_awq.quant.text_sources import DEFAULT_LANGUAGES, LanguageText, builtin_text, file_text
from lape_awq.quant.token_streams import token_stream


@dataclass(frozen=True)
class CalibrationSpec:
    """What the quantizer calibrates on; recorded in the checkpoint manifest."""

    # Measured (README): the 8-language mix closes 27% of the Korean gap that English-only AWQ leaves.
    langs: tuple[str, ...] = DEFAULT_LANGUAGES
    samples: int = 16
    seqlen: int = 512
    seed: int = 0
    text_file: str | None = None  # replaces the built-in corpus when given
    # (language, weight) pairs: each token of that language's sequences counts `weight` times in the
    # quantizer's objectives (GPTQ's Hessian, AWQ's scale and clip losses); unlisted languages count 1, and
    # a weight-0 language's sequences are left out of the calibration batch altogether.
    weights: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seqlen < 8:
            raise UserError(
                f"calibration needs samples >= 1 and seqlen >= 8, got {self.samples}, {self.seqlen}"
            )
        if not self.langs and self.text_file is None:
            raise UserError("calibration needs --calib-langs or --calib-text")
        if not self.weights:
            return
        if self.text_file is not None:
            raise UserError("--calib-weights weighs the languages of --calib-langs, not a --calib-text file")
        langs = [lang for lang, _ in self.weights]
        unknown = sorted(set(langs) - set(self.langs))
        if unknown:
            raise UserError(
                f"--calib-weights names {', '.join(unknown)}, not in the calibration languages "
                f"{','.join(self.langs)}"
            )
        if len(set(langs)) != len(langs):
            raise UserError("--calib-weights names a language twice")
        if any(not math.isfinite(w) or w < 0 for _, w in self.weights):
            raise UserError("--calib-weights must be finite and >= 0")
        if all(self.weight(lang) == 0 for lang in self.langs):
            raise UserError("--calib-weights gives every calibration language weight 0")

    def weight(self, lang: str) -> float:
        """The weight of one calibration language's tokens (1 unless --calib-weights says otherwise)."""
        return dict(self.weights).get(lang, 1.0)

    def record(self) -> dict[str, Any]:
        """The spec as the checkpoint manifest records it; unweighted, without the `weights` key (the form
        manifests had before weights existed, so those checkpoints still match their recipe)."""
        out = asdict(self)
        if not self.weights:
            del out["weights"]
        return out


def calibration_texts(spec: CalibrationSpec) -> list[LanguageText]:
    if spec.text_file is not None:
        return [file_text("calib", Path(spec.text_file))]
    return [builtin_text(lang, "fit") for lang in spec.langs]


def calibration_batch(tokenizer: object, spec: CalibrationSpec) -> torch.Tensor:
    """[samples, 1 + seqlen] token ids (<bos> first where the tokenizer has one), languages round-robin."""
    return labelled_calibration_batch(tokenizer, spec)[0]


def weighted_calibration_batch(
    tokenizer: object, spec: CalibrationSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The calibration batch without the sequences of weight-0 languages, and each remaining sequence's
    weight (float64 [sequences]; None when they are all equal, the unweighted objectives). Leaving a
    weight-0 language out is what weight 0 means (its tokens add nothing to the sums, nor to the count
    that normalises them), and makes the result exactly that of calibrating without it."""
    ids, langs = labelled_calibration_batch(tokenizer, spec)
    weights = torch.tensor([spec.weight(lang) for lang in langs], dtype=torch.float64)
    used = weights > 0
    ids, weights = ids[used], weights[used]
    return ids, None if bool((weights == weights[0]).all()) else weights


def labelled_calibration_batch(tokenizer: object, spec: CalibrationSpec) -> tuple[torch.Tensor, list[str]]:
    """`calibration_batch` and the language of each of its sequences."""
    texts = calibration_texts(spec)
    per_text = -(-spec.samples // len(texts))
    bos = getattr(tokenizer, "bos_token_id", None)
    pools: list[list[list[int]]] = []  # per text, its sequences
    for text in texts:
        ids = token_stream(tokenizer, text, per_text * spec.seqlen, spec.seed)
        seqs = [ids[i : i + spec.seqlen] for i in range(0, len(ids) - spec.seqlen + 1, spec.seqlen)]
        if not seqs:
            raise UserError(f"{text.source} has fewer than {spec.seqlen} tokens: lower --calib-seqlen")
        pools.append(seqs)
    picked: list[tuple[list[int], str]] = []
    for i in range(max(len(p) for p in pools)):
        picked.extend((p[i], text.lang) for p, text in zip(pools, texts, strict=True) if i < len(p))
    if len(picked) < spec.samples:
        raise UserError(
            f"only {len(picked)} calibration sequences of {spec.seqlen} tokens exist; lower --calib-samples"
        )
    prefix = [] if bos is None else [bos]
    picked = picked[: spec.samples]
    return torch.tensor([prefix + s for s, _ in picked]), [lang for _, lang in picked]
