"""Which vocabulary rows a language needs kept in FP16 (the vocabulary counterpart of its LAPE neurons).

The rule, chosen by measurement (`lape-awq bench vocab`; README Results, "The quantized vocabulary
alone"): first the tokens of the language's fit text, most frequent first; then, to fill the budget, the
tokens written in the language's own script, in the tokenizer's order. BPE vocabularies (Gemma's, Llama's,
Qwen's) number their tokens in merge order, so a lower id is a token that was frequent in the tokenizer's
own (general-domain) training text: the second part covers the language's common tokens that one corpus
never showed, where the first covers the corpus.
"""

from __future__ import annotations

from typing import Any

import torch

from lape_awq.quant.errors import UserError
from lape_awq.quant.text_sources import LanguageText
from lape_awq.quant.token_streams import token_stream

# Unicode blocks of the scripts that identify a language's tokens (languages written in Latin script have
# none: their rows come from text frequency alone).
SCRIPTS: dict[str, tuple[tuple[int, int], ...]] = {
    "ko": ((0xAC00, 0xD7A3), (0x1100, 0x11FF), (0x3130, 0x318F)),  # Hangul syllables, jamo, compat. jamo
    "ja": ((0x3040, 0x309F), (0x30A0, 0x30FF), (0x4E00, 0x9FFF)),  # hiragana, katakana, CJK ideographs
    "zh": ((0x4E00, 0x9FFF), (0x3400, 0x4DBF)),  # CJK ideographs and extension A
    "th": ((0x0E00, 0x0E7F),),
    "ru": ((0x0400, 0x04FF),),
    "uk": ((0x0400, 0x04FF),),
    "bg": ((0x0400, 0x04FF),),
    "ar": ((0x0600, 0x06FF),),
    "he": ((0x0590, 0x05FF),),
    "el": ((0x0370, 0x03FF),),
    "hi": ((0x0900, 0x097F),),
    "bn": ((0x0980, 0x09FF),),
}
# The whole fit text of a language is counted (the built-in corpus has 15k-200k tokens per language).
_ALL_TOKENS = 10**8


def token_counts(tokenizer: Any, text: LanguageText, vocab_size: int) -> torch.Tensor:
    """How often each token id occurs in `text`: float [vocab_size]."""
    ids = torch.tensor(token_stream(tokenizer, text, _ALL_TOKENS, seed=0))
    if int(ids.max()) >= vocab_size:
        raise UserError(f"the tokenizer makes id {int(ids.max())}; the model's vocabulary has {vocab_size}")
    return torch.bincount(ids, minlength=vocab_size).float()


def script_tokens(tokenizer: Any, lang: str, vocab_size: int) -> torch.Tensor:
    """bool [vocab_size]: tokens holding a character of `lang`'s script (none for Latin-script languages)."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    blocks = SCRIPTS.get(lang)
    if not blocks:
        return mask
    # Decoded, not the vocabulary's strings: byte-level BPE (Llama 3, Qwen) spells Hangul as mapped bytes.
    size = min(vocab_size, len(tokenizer))
    for i, token in enumerate(tokenizer.batch_decode([[i] for i in range(size)])):
        if any(lo <= ord(c) <= hi for c in token for lo, hi in blocks):
            mask[i] = True
    return mask


def language_rows(tokenizer: Any, text: LanguageText, vocab_size: int, budget: int) -> torch.Tensor:
    """Up to `budget` token ids for the language of `text`, in priority order: its tokens by frequency in
    the text, then its script's other tokens by id."""
    counts = token_counts(tokenizer, text, vocab_size)
    seen = counts.nonzero()[:, 0]
    seen = seen[counts[seen].argsort(descending=True, stable=True)]
    unseen_script = (script_tokens(tokenizer, text.lang, vocab_size) & (counts == 0)).nonzero()[:, 0]
    return torch.cat([seen, unseen_script])[:budget]


def select_rows(tokenizer: Any, texts: list[LanguageText], vocab_size: int, budget: int) -> torch.Tensor:
    """The kept rows of several languages: the budget split evenly between them (a language that needs
    fewer leaves its share to the others), as sorted unique int64 ids."""
    if budget < 0:
        raise UserError(f"--max-vocab-rows must be >= 0, got {budget}")
    if budget == 0 or not texts:
        return torch.empty(0, dtype=torch.long)
    ranked = [language_rows(tokenizer, t, vocab_size, budget) for t in texts]
    chosen: list[int] = []
    taken: set[int] = set()
    cursors = [0] * len(ranked)
    # Round-robin over the languages' priority lists, skipping rows another language already took.
    while len(chosen) < budget and any(c < len(r) for c, r in zip(cursors, ranked, strict=True)):
        for i, r in enumerate(ranked):
            while cursors[i] < len(r) and int(r[cursors[i]]) in taken:
                cursors[i] += 1
            if cursors[i] < len(r) and len(chosen) < budget:
                taken.add(int(r[cursors[i]]))
                chosen.append(int(r[cursors[i]]))
                cursors[i] += 1
    return torch.tensor(sorted(chosen), dtype=torch.long)
