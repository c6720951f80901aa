"""The vocabulary quantizer: kept rows exact, everything else AWQ's min/max groups after a clipping search
that never makes a group's weighted error worse; which rows a language keeps (text frequency first, then
its script by tokenizer rank); the options' checks."""

from __future__ import annotations

import pytest
import torch

from lape_awq.quant.errors import UserError
from lape_awq.quant.text_sources import LanguageText
from lape_awq.quant.vocab.quantizer import VocabSpec, clip_importance, clip_weight, quantize_vocab
from lape_awq.quant.vocab.rows import language_rows, script_tokens, select_rows, token_counts
from lape_awq.quant.w4_math import quantize_groups


def test_kept_rows_are_exact_and_the_rest_are_min_max_groups() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 128, generator=gen)
    kept = torch.tensor([0, 17, 299])
    for bits in (4, 8):
        q = quantize_vocab(weight, VocabSpec(bits, 64), kept, clip=False)
        dense = q.quant.dequantize()
        plain = quantize_groups(weight, 64, bits=bits)
        assert torch.equal(q.quant.codes, plain.codes) and torch.equal(q.quant.scales, plain.scales)
        assert q.quant.codes.max() == 2**bits - 1
        restored = dense[kept] + q.sparse.float()
        assert (restored - weight[kept]).abs().max() <= 2e-3  # the fp16 rounding of the residual
        others = torch.ones(300, dtype=torch.bool)
        others[kept] = False
        assert torch.equal(q.sparse_idx, kept)
        error = (dense[others] - weight[others]).abs().max()
        assert error <= (0.05 if bits == 8 else 0.6)  # half a step of the group's range
    q4, q8 = (quantize_vocab(weight, VocabSpec(bits, 64), clip=False) for bits in (4, 8))
    e4, e8 = ((q.quant.dequantize() - weight).pow(2).mean() for q in (q4, q8))
    assert e8 < e4 / 100  # 16x finer steps: ~256x smaller squared error
    assert q4.sparse_idx is None and q4.sparse is None


def test_clipping_never_worsens_a_groups_weighted_error() -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(500, 128, generator=gen)
    weight[::7, 3] *= 8  # outliers: clipping them pays off for the other weights of the group
    importance = clip_importance(torch.rand(128, generator=gen, dtype=torch.float64) * 4, True, True)
    assert importance is not None and importance.min() >= 1.0  # tied: the embedding's plain error counts too

    def group_errors(w: torch.Tensor) -> torch.Tensor:
        q = quantize_vocab(w, VocabSpec(4, 64), clip=False).quant.dequantize()
        return ((q - weight).pow(2) * importance).reshape(500, 2, 64).sum(-1)

    clipped = clip_weight(weight, 4, 64, importance)
    assert (clipped.abs() <= weight.abs()).all()  # only ever shrinks toward zero
    plain, searched = group_errors(weight), group_errors(clipped)
    assert (searched <= plain * (1 + 1e-6)).all()
    assert searched.sum() < 0.97 * plain.sum()
    q = quantize_vocab(weight, VocabSpec(4, 64), torch.tensor([7]), importance)
    assert torch.allclose(q.quant.dequantize()[7] + q.sparse[0].float(), weight[7], atol=2e-3)
    assert clip_importance(torch.ones(4, dtype=torch.float64), True, False) is None  # untied embedding: plain


def test_vocab_spec_checks() -> None:
    with pytest.raises(UserError, match="16, 8 or 4"):
        VocabSpec(bits=3)
    with pytest.raises(UserError, match="32, 64 or 128"):
        VocabSpec(bits=4, group_size=96)
    with pytest.raises(UserError, match=">= 0"):
        VocabSpec(bits=4, max_rows=-1)
    for max_rows in (10, 0):
        with pytest.raises(UserError, match="needs --vocab-bits 8 or 4"):
            VocabSpec(bits=16, keep_langs=("ko",), max_rows=max_rows)
    with pytest.raises(UserError, match="not a multiple"):
        quantize_vocab(torch.zeros(4, 96), VocabSpec(4, 64))


KOREAN = "서울은 한국의 수도입니다.\n\n서울은 크고 아름답습니다. 한국어를 배웁니다."
ENGLISH = "The capital of France is Paris.\n\nParis is a large city. The city is old."


def test_a_language_keeps_its_frequent_tokens_then_its_script(tokenizer) -> None:
    vocab = len(tokenizer)
    text = LanguageText("ko", KOREAN, "test", "all")
    counts = token_counts(tokenizer, text, vocab)
    rows = language_rows(tokenizer, text, vocab, budget=500)
    seen = int((counts > 0).sum())
    # First every token of the text, most frequent first ...
    assert torch.equal(rows[:seen].sort().values, counts.nonzero()[:, 0])
    assert counts[rows[:seen]].diff().le(0).all()
    # ... then unseen Hangul tokens in the tokenizer's order.
    hangul = script_tokens(tokenizer, "ko", vocab)
    rest = rows[seen:]
    assert len(rows) == 500 and hangul[rest].all() and (counts[rest] == 0).all()
    assert rest.diff().gt(0).all() and int(rest[0]) == int((hangul & (counts == 0)).nonzero()[0, 0])
    서 = tokenizer("서울", add_special_tokens=False).input_ids
    assert all(hangul[i] for i in 서)
    assert not hangul[tokenizer(" the", add_special_tokens=False).input_ids].any()
    # A language written in Latin script has no script rows: its text's tokens only.
    english = LanguageText("en", ENGLISH, "test", "all")
    assert len(language_rows(tokenizer, english, vocab, budget=500)) == int(
        (token_counts(tokenizer, english, vocab) > 0).sum()
    )


def test_the_budget_is_split_between_languages(tokenizer) -> None:
    vocab = len(tokenizer)
    ko, en = LanguageText("ko", KOREAN, "t", "all"), LanguageText("en", ENGLISH, "t", "all")
    rows = select_rows(tokenizer, [ko, en], vocab, budget=40)
    assert len(rows) == 40 and rows.diff().gt(0).all()
    en_rows = set(language_rows(tokenizer, en, vocab, 40).tolist())
    # Round robin: each language's 10 first are in, whatever the other language ranks first.
    for lang in (ko, en):
        assert set(language_rows(tokenizer, lang, vocab, 10).tolist()) <= set(rows.tolist())
    # English has fewer distinct tokens than its share: Korean takes what is left.
    both = select_rows(tokenizer, [ko, en], vocab, budget=300)
    assert set(both.tolist()) >= en_rows and len(both) == 300
    assert select_rows(tokenizer, [ko], vocab, budget=0).numel() == 0
