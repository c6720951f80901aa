"""LAPE selection against a slow, obvious re-statement of the reference algorithm."""

from __future__ import annotations

import math

import pytest
import torch

from lape_awq.quant.errors import UserError
from lape_awq.quant.lape.selection import (
    LapeOptions,
    activation_probabilities,
    lape_entropy,
    select_language_neurons,
)


def slow_lape(probs: list[list[list[float]]], top_rate: float, filter_rate: float, bar_ratio: float):
    """Plain-Python loops over [layer][neuron][lang]; returns (entropy, selected set, {lang: set})."""
    layers, neurons, langs = len(probs), len(probs[0]), len(probs[0][0])
    flat = sorted(p for layer in probs for neuron in layer for p in neuron)

    def kth(ratio: float) -> float:
        k = min(max(round(len(flat) * ratio), 1), len(flat))
        return flat[k - 1]

    entropy = {}
    for i in range(layers):
        for j in range(neurons):
            row = probs[i][j]
            total = sum(row)
            h = 0.0
            for p in row:
                q = p / total if total > 0 else 0.0
                if q > 0:
                    h -= q * math.log(q)
            entropy[i, j] = h if any(p > kth(filter_rate) for p in row) else math.inf
    quota = round(layers * neurons * top_rate)
    ranked = sorted((h, i, j) for (i, j), h in entropy.items() if h != math.inf)
    selected = {(i, j) for _, i, j in ranked[:quota]}
    bar = kth(bar_ratio)
    owners = {g: {(i, j) for (i, j) in selected if probs[i][j][g] > bar} for g in range(langs)}
    return entropy, selected, owners


def check_against_slow(probs: torch.Tensor, options: LapeOptions) -> None:
    sel = select_language_neurons(probs, options)
    entropy, selected, owners = slow_lape(
        probs.tolist(), options.top_rate, options.filter_rate, options.activation_bar_ratio
    )
    langs = probs.shape[-1]
    for (i, j), h in entropy.items():
        got = float(sel.entropy[i, j])
        assert (got == h) if h == math.inf else got == pytest.approx(h, abs=1e-12), (i, j)
    assert {tuple(x) for x in sel.selected.nonzero().tolist()} == selected
    for g in range(langs):
        assert {tuple(x) for x in sel.language_mask[g].nonzero().tolist()} == owners[g]


@pytest.mark.parametrize("seed", range(6))
def test_random_probabilities_match_slow_reference(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    layers, neurons, langs = 3, 40 + seed * 7, 4 + seed % 5
    probs = torch.rand(layers, neurons, langs, generator=gen, dtype=torch.float64) ** 3
    # Exact zeros and exact ties, which the quantiles and the stable order must handle.
    probs[probs < 0.05] = 0.0
    probs[0, :5] = probs[0, 5]
    options = LapeOptions(top_rate=0.02 + 0.01 * seed, filter_rate=0.9, activation_bar_ratio=0.8)
    check_against_slow(probs, options)


def test_hand_built_cases() -> None:
    langs = 8  # ko first
    probs = torch.full((2, 50, langs), 0.10, dtype=torch.float64)
    probs[0, 3] = 0.0
    probs[0, 3, 0] = 0.9  # only Korean
    probs[1, 7] = 0.95  # active in every language
    probs[1, 9] = 0.0  # never active
    probs[0, 20, :2] = 0.8  # Korean and English
    probs[0, 20, 2:] = 0.0
    options = LapeOptions(top_rate=0.02)  # quota round(100 * 0.02) = 2
    sel = select_language_neurons(probs, options)
    check_against_slow(probs, options)
    assert sel.entropy[0, 3] == 0.0
    assert sel.entropy[1, 7] == pytest.approx(math.log(langs))
    assert sel.entropy[1, 9] == math.inf  # filtered: no p above the quantile
    assert set(map(tuple, sel.selected.nonzero().tolist())) == {(0, 3), (0, 20)}
    assert set(map(tuple, sel.language_mask[0].nonzero().tolist())) == {(0, 3), (0, 20)}
    assert set(map(tuple, sel.language_mask[1].nonzero().tolist())) == {(0, 20)}
    assert not sel.language_mask[2:].any()


def test_tied_entropies_break_towards_lower_index() -> None:
    probs = torch.zeros(1, 10, 3, dtype=torch.float64)
    probs[0, :, 0] = 0.5  # ten identical Korean-only neurons: all entropy 0, all candidates
    probs[0, :, 1] = 0.01
    sel = select_language_neurons(probs, LapeOptions(top_rate=0.3, filter_rate=0.5))
    assert sel.selected[0].nonzero().flatten().tolist() == [0, 1, 2]


def test_fewer_candidates_than_quota_selects_only_candidates() -> None:
    probs = torch.zeros(1, 20, 2, dtype=torch.float64)
    probs[0, 0, 0] = 1.0
    sel = select_language_neurons(probs, LapeOptions(top_rate=0.5))
    assert sel.selected.sum() == 1 and bool(sel.selected[0, 0])


def test_entropy_and_probabilities() -> None:
    counts = torch.tensor([[[3, 0], [2, 2]]])
    probs = activation_probabilities(counts, torch.tensor([4, 8]))
    assert probs.dtype == torch.float64
    assert probs.tolist() == [[[0.75, 0.0], [0.5, 0.25]]]
    h = lape_entropy(probs)
    assert h[0, 0] == 0.0
    assert h[0, 1] == pytest.approx(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3))
    with pytest.raises(ValueError):
        activation_probabilities(counts, torch.tensor([4, 0]))
    with pytest.raises(ValueError):
        activation_probabilities(counts, torch.tensor([4, 8, 1]))


@pytest.mark.parametrize("bad", [dict(top_rate=0.0), dict(filter_rate=1.5), dict(activation_bar_ratio=-0.1)])
def test_options_are_validated(bad: dict) -> None:
    with pytest.raises(UserError):
        LapeOptions(**bad)
