"""Neurons file: exact round trip, atomic write, and refusal of files that are not ours or are broken."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lape_awq.quant.errors import UserError
from lape_awq.quant.lape.neurons_file import NeuronsFile
from lape_awq.quant.lape.selection import activation_probabilities, select_language_neurons


def sample_file() -> NeuronsFile:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.tensor([900, 1000, 800])
    over_zero = (torch.rand(4, 32, 3, generator=gen) * tokens).long()
    sel = select_language_neurons(activation_probabilities(over_zero, tokens))
    return NeuronsFile(["ko", "en", "ja"], over_zero, tokens, sel.entropy, sel.language_mask, {"note": "x"})


def test_round_trip_is_exact(tmp_path: Path) -> None:
    nf = sample_file()
    nf.save(tmp_path / "a" / "n.safetensors")
    back = NeuronsFile.load(tmp_path / "a" / "n.safetensors")
    assert back.languages == nf.languages and back.metadata == nf.metadata
    for name in ("over_zero", "tokens", "entropy", "language_mask"):
        assert torch.equal(getattr(back, name), getattr(nf, name)), name
    assert [t.tolist() for t in back.neurons("ko")] == [
        row.nonzero().flatten().tolist() for row in nf.mask("ko")
    ]
    assert torch.equal(back.probs, nf.over_zero.double() / nf.tokens.double())
    assert list((tmp_path / "a").iterdir()) == [tmp_path / "a" / "n.safetensors"]  # no temp file left


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "n.safetensors"
    sample_file().save(path)
    before = path.read_bytes()
    broken = sample_file()
    broken.metadata = {"bad": object()}  # not JSON: the write fails
    with pytest.raises(TypeError):
        broken.save(path)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_unknown_language_is_refused() -> None:
    with pytest.raises(UserError, match="'de' is not in this neurons file"):
        sample_file().mask("de")


def test_shape_mismatch_is_refused() -> None:
    nf = sample_file()
    with pytest.raises(UserError, match="language_mask has shape"):
        NeuronsFile(nf.languages, nf.over_zero, nf.tokens, nf.entropy, nf.language_mask[:2])


def test_bad_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        NeuronsFile.load(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="not a readable safetensors file"):
        NeuronsFile.load(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(UserError, match="not a lape-awq neurons file"):
        NeuronsFile.load(foreign)
    nf = sample_file()
    lacking = tmp_path / "lacking.safetensors"
    meta = {"format": "lape_awq.neurons", "format_version": 1, "languages": nf.languages}
    save_file({"tokens": nf.tokens}, lacking, metadata={"lape_awq": json.dumps(meta)})
    with pytest.raises(UserError, match="lacks tensor"):
        NeuronsFile.load(lacking)
