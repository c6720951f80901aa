"""Quantize the vocabulary matrix [V, H] (the tied embedding / LM head, or each of them when untied): groups
along H at 8 or 4 bits, AWQ's min/max quantizer after a clipping search, the kept rows exact through FP16
residuals.

The clipping search shrinks each group's range where that lowers the error the matrix causes: as LM head,
the logit error sum_k E[x_k^2] d_k^2 over the final hidden states x (AWQ's activation-aware weighting); as
embedding, the plain squared error of the looked-up row; a tied matrix, both. Measured on the default model
at 4 bits (bench/results/vocab_quality_2026-12-02.md): ko perplexity +52.4% -> +39.0% over float, en
+17.3% -> +12.8%.

The vocabulary is not touched by AWQ's scales (they fold into the norms and linears after the embedding), so
it is quantized from the float model's own weight, once, whatever the decoder's method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lape_awq.kernels.vocab_codes import VOCAB_BITS
from lape_awq.quant.errors import UserError
from lape_awq.quant.w4_math import GroupQuant, QuantizedVocab, quantize_groups

FLOAT_BITS = 16  # --vocab-bits 16: the vocabulary stays FP16, as in plain AWQ checkpoints
# The default recipe, chosen by measurement (`lape-awq bench vocab`; README Results, "The quantized vocabulary
# alone"): 4-bit groups of 128 for every method; the language-aware method (AWQ-opt) also keeps its
# languages' rows in FP16 within this budget.
DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 128
DEFAULT_KEPT_ROWS = 2048


@dataclass(frozen=True)
class VocabSpec:
    """How the vocabulary is stored: bits (16 = FP16, not quantized), group size, and which languages' rows
    stay FP16 within a row budget."""

    bits: int = FLOAT_BITS
    group_size: int = DEFAULT_GROUP_SIZE
    keep_langs: tuple[str, ...] = ()
    max_rows: int = 0

    def __post_init__(self) -> None:
        if self.bits not in (FLOAT_BITS, *VOCAB_BITS):
            raise UserError(f"--vocab-bits must be 16, 8 or 4, got {self.bits}")
        if self.group_size not in (32, 64, 128):
            raise UserError(f"--vocab-group-size must be 32, 64 or 128, got {self.group_size}")
        if self.max_rows < 0:
            raise UserError(f"--max-vocab-rows must be >= 0, got {self.max_rows}")
        if self.bits == FLOAT_BITS and self.keep_langs:
            raise UserError("--keep-vocab-lang needs --vocab-bits 8 or 4 (FP16 keeps every row exact)")

    @property
    def quantized(self) -> bool:
        return self.bits != FLOAT_BITS

    def check_fits(self, hidden: int) -> None:
        if self.quantized and hidden % self.group_size:
            raise UserError(
                f"the hidden size {hidden} is not a multiple of --vocab-group-size {self.group_size}"
            )


def default_vocab(keep_langs: tuple[str, ...] = ()) -> VocabSpec:
    """`quantize`'s default vocabulary: DEFAULT_BITS, with `keep_langs`' rows kept (AWQ-opt's languages)."""
    return VocabSpec(DEFAULT_BITS, DEFAULT_GROUP_SIZE, keep_langs, DEFAULT_KEPT_ROWS if keep_langs else 0)


# Clipping grid: the group's range times 1, 0.975, ..., 0.725 (measured: no group chose a smaller one).
CLIP_STEPS, CLIP_STEP = 12, 0.025
_CLIP_ROWS = 16384  # rows searched at a time: [16k, 640] fp32 temporaries of 40 MiB


# Calibration sequences whose final hidden states weigh the LM head's error (a [H] statistic: 2k tokens do).
HIDDEN_SAMPLES = 4


@torch.no_grad()
def hidden_second_moment(
    model: torch.nn.Module, batch: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """E[x_k^2] of the LM head's input (the final, normed hidden states) over the first HIDDEN_SAMPLES
    calibration sequences: float64 [H]; `weights` weighs each sequence's tokens (None: all 1)."""
    total = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    count = 0.0
    for i, seq in enumerate(batch[:HIDDEN_SAMPLES].split(1)):
        hidden = model.model(input_ids=seq, use_cache=False).last_hidden_state
        w = 1.0 if weights is None else float(weights[i])
        total += w * hidden.double().pow(2).sum((0, 1))
        count += w * hidden.shape[1]
    return total / count


def clip_importance(hidden_sq: torch.Tensor | None, as_embedding: bool, as_head: bool) -> torch.Tensor | None:
    """Per hidden channel, how much a weight error there costs: E[x^2] / mean (LM head) + 1 (embedding)."""
    if hidden_sq is None or not as_head:
        return None  # the plain squared error: no need for a weighting
    importance = hidden_sq.float() / hidden_sq.float().mean().clamp_min(1e-12)
    return importance + 1.0 if as_embedding else importance


def clip_weight(w: torch.Tensor, bits: int, group: int, importance: torch.Tensor | None) -> torch.Tensor:
    """`w` with each group clamped to the shrunk range whose quantization error, weighted by `importance`
    (per hidden channel; None: uniform), is smallest."""
    rows, hidden = w.shape
    weights = (torch.ones(hidden) if importance is None else importance).reshape(1, -1, group)
    out = torch.empty_like(w)
    for start in range(0, rows, _CLIP_ROWS):
        x = w[start : start + _CLIP_ROWS].reshape(-1, hidden // group, group)
        hi, lo = x.amax(-1, keepdim=True).clamp_min(0.0), x.amin(-1, keepdim=True).clamp_max(0.0)
        best_err = torch.full(x.shape[:2], torch.inf)
        best = torch.ones(x.shape[:2])
        for i in range(CLIP_STEPS):
            ratio = 1.0 - CLIP_STEP * i
            clamped = x.clamp(lo * ratio, hi * ratio)
            q = quantize_groups(clamped.reshape(-1, hidden), group, bits=bits).dequantize()
            err = ((q.reshape(x.shape) - x).pow(2) * weights).sum(-1)
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, ratio, best)
        ratio = best.unsqueeze(-1)
        out[start : start + _CLIP_ROWS] = x.clamp(lo * ratio, hi * ratio).reshape(-1, hidden)
    return out


def quantize_vocab(
    weight: torch.Tensor,
    spec: VocabSpec,
    kept: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
    clip: bool = True,
) -> QuantizedVocab:
    """The quantized form of one vocabulary matrix; `kept` (sorted int64 token ids) stay exact. `clip`
    searches each group's range first, its error weighted by `importance` (see clip_importance)."""
    spec.check_fits(weight.shape[1])
    w = weight.detach().float()
    searched = clip_weight(w, spec.bits, spec.group_size, importance) if clip else w
    quant = quantize_groups(searched, spec.group_size, bits=spec.bits)
    return with_kept_rows(QuantizedVocab(quant, spec.bits), weight, kept)


def with_kept_rows(codes: QuantizedVocab, weight: torch.Tensor, kept: torch.Tensor | None) -> QuantizedVocab:
    """`codes` (a vocabulary matrix quantized with no kept rows) with the `kept` rows of the float `weight`
    made exact by their FP16 residuals."""
    if kept is None or not kept.numel():
        return QuantizedVocab(codes.quant, codes.bits)
    quant = codes.quant
    rows = GroupQuant(quant.codes[kept], quant.zeros[kept], quant.scales[kept], quant.group_size)
    residual = weight.detach().float()[kept] - rows.dequantize()
    return QuantizedVocab(quant, codes.bits, kept, residual.half())


def vocab_section(spec: VocabSpec, kept: torch.Tensor | None, selection: str) -> dict[str, Any]:
    """The quantization_config's `vocab` section (docs/checkpoint-format.md)."""
    return {
        "bits": spec.bits,
        "group_size": spec.group_size,
        "kept_rows": 0 if kept is None else int(kept.numel()),
        "languages": list(spec.keep_langs) if kept is not None and kept.numel() else [],
        "selection": selection,
    }
