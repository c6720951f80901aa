"""Built-in text splits, user files and token streams."""

from __future__ import annotations

from pathlib import Path

import pytest

from lape_awq.quant.errors import UserError
from lape_awq.quant.text_sources import (
    DEFAULT_LANGUAGES,
    builtin_text,
    file_text,
    language_texts,
    paragraphs,
    parse_text_args,
)
from lape_awq.quant.token_streams import batches, chunk_sequences, token_stream


@pytest.mark.parametrize("lang", DEFAULT_LANGUAGES)
def test_fit_and_heldout_are_disjoint_and_cover_everything(lang: str) -> None:
    fit = paragraphs(builtin_text(lang, "fit").text)
    held = paragraphs(builtin_text(lang, "heldout").text)
    everything = paragraphs(builtin_text(lang, "all").text)
    assert len(held) >= 30 and len(fit) >= 4 * len(held) - 4
    assert not set(fit) & set(held) or all(everything.count(p) > 1 for p in set(fit) & set(held))
    assert sorted(fit + held) == sorted(everything)


def test_text_records_its_source(tmp_path: Path) -> None:
    t = builtin_text("ko")
    assert t.source == "dataset-build:kor" and t.split == "fit" and len(t.sha256) == 64
    f = tmp_path / "k.txt"
    f.write_text("가나다\r\n\r\n라마바\n", encoding="utf-8")
    assert paragraphs(file_text("ko", f).text) == ["가나다", "라마바"]


def test_bad_files_and_codes(tmp_path: Path) -> None:
    latin1 = tmp_path / "l.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        file_text("fr", latin1)
    with pytest.raises(UserError, match="unknown language code 'kr'"):
        builtin_text("kr")
    with pytest.raises(UserError, match="listed twice"):
        language_texts(["ko", "ko"], {})
    with pytest.raises(UserError, match="given twice"):
        parse_text_args(["ko=a", "ko=b"])


def test_token_stream_is_seeded_and_within_budget(tokenizer) -> None:
    text = builtin_text("ja")
    a = token_stream(tokenizer, text, 700, seed=1)
    assert a == token_stream(tokenizer, text, 700, seed=1)
    assert a != token_stream(tokenizer, text, 700, seed=2)
    assert len(a) == 700 and tokenizer.bos_token_id not in a


def test_sequences_and_batches() -> None:
    seqs = chunk_sequences(list(range(10, 33)), 10, bos_id=2)
    assert [s.tolist()[:2] for s in seqs] == [[2, 10], [2, 20], [2, 30]]
    assert [len(s) for s in seqs] == [11, 11, 4]
    shapes = [tuple(b.shape) for b in batches(seqs, 8)]
    assert shapes == [(2, 11), (1, 4)]
    assert [len(s) for s in chunk_sequences([5, 6, 7], 2, bos_id=None)] == [2, 1]
