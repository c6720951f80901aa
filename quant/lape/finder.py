"""Find the language-specific FFN neurons of a model: token streams -> activation counts -> LAPE."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from lape_awq.quant.errors import UserError
from lape_awq.quant.lape.activation_stats import count_positive_activations
from lape_awq.quant.lape.selection import (
    LapeOptions,
    LapeSelection,
    activation_probabilities,
    select_language_neurons,
)
from lape_awq.quant.text_sources import LanguageText
from lape_awq.quant.token_streams import batches, chunk_sequences, token_stream


@dataclass(frozen=True)
class SamplingSettings:
    """How much text is run, and how; all of it is recorded in the neurons file."""

    tokens_per_language: int = 30_000
    # 256 x 4 measured fastest on the 2-core CPU (bench/lape_speed.py): 1.4x the tokens/s of 512 x 8.
    seq_len: int = 256
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("tokens_per_language", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


def require_languages(langs: list[str]) -> None:
    """LAPE's entropy is over languages: refuse fewer than two, before any model work."""
    if len(langs) < 2:
        raise UserError(f"LAPE compares languages: give at least two, got {','.join(langs) or 'none'}")


@dataclass(frozen=True)
class FinderResult:
    languages: list[str]
    over_zero: torch.Tensor  # [L, N, G] int64
    tokens: torch.Tensor  # [G] int64
    selection: LapeSelection


def find_language_neurons(
    model: nn.Module,
    tokenizer: object,
    texts: list[LanguageText],
    options: LapeOptions | None = None,
    sampling: SamplingSettings | None = None,
    progress: bool = True,
) -> FinderResult:
    """Count activations language by language (tqdm per language), then run LAPE selection."""
    sampling = sampling or SamplingSettings()
    require_languages([t.lang for t in texts])
    bos_id = getattr(tokenizer, "bos_token_id", None)
    per_lang_counts, per_lang_tokens = [], []
    for text in texts:
        ids = token_stream(tokenizer, text, sampling.tokens_per_language, sampling.seed)
        seqs = chunk_sequences(ids, sampling.seq_len, bos_id)
        bar = tqdm(
            batches(seqs, sampling.batch_size),
            desc=f"LAPE {text.lang}",
            unit="batch",
            disable=not progress,
            postfix={"tokens": len(ids)},
        )
        counts, n = count_positive_activations(model, bar, skip_first_position=bos_id is not None)
        per_lang_counts.append(counts)
        per_lang_tokens.append(n)
    over_zero = torch.stack(per_lang_counts, dim=-1)
    tokens = torch.tensor(per_lang_tokens, dtype=torch.int64)
    selection = select_language_neurons(activation_probabilities(over_zero, tokens), options)
    return FinderResult([t.lang for t in texts], over_zero, tokens, selection)
