"""Turn a language's text into a deterministic token stream and fixed-length model inputs."""

from __future__ import annotations

import random

import torch

from lape_awq.quant.errors import UserError
from lape_awq.quant.text_sources import LanguageText, paragraphs


def token_stream(tokenizer: object, text: LanguageText, budget: int, seed: int) -> list[int]:
    """Up to `budget` tokens of whole paragraphs in a seeded shuffled order (the last one cut to fit)."""
    paras = paragraphs(text.text)
    order = list(range(len(paras)))
    random.Random(seed).shuffle(order)
    out: list[int] = []
    for i in order:
        if len(out) >= budget:
            break
        ids = tokenizer(paras[i] + "\n\n", add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        out.extend(ids[: budget - len(out)])
    if not out:
        raise UserError(f"no tokens in the {text.lang!r} text ({text.source})")
    return out


def chunk_sequences(ids: list[int], seq_len: int, bos_id: int | None) -> list[torch.Tensor]:
    """Split into sequences of at most `seq_len` text tokens, each led by `bos_id` when the model has one."""
    prefix = [] if bos_id is None else [bos_id]
    return [torch.tensor(prefix + ids[i : i + seq_len]) for i in range(0, len(ids), seq_len)]


def batches(seqs: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Stack equal-length sequences into batches of at most `batch_size`; no padding is ever needed."""
    by_len: dict[int, list[torch.Tensor]] = {}
    for s in seqs:
        by_len.setdefault(len(s), []).append(s)
    out = []
    for group in by_len.values():
        out.extend(torch.stack(group[i : i + batch_size]) for i in range(0, len(group), batch_size))
    return out
