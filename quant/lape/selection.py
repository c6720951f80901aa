"""LAPE (language activation probability entropy, Tang et al. 2024): pure math on activation counts.

Layout everywhere: probabilities are [layers, neurons, languages], as in the reference code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from lape_awq.quant.errors import UserError


@dataclass(frozen=True)
class LapeOptions:
    """Selection knobs; the defaults are those of the reference implementation."""

    top_rate: float = 0.01  # fraction of all neurons kept: those with the lowest entropy
    filter_rate: float = 0.95  # candidate only if some language's p exceeds this quantile of all p
    activation_bar_ratio: float = 0.95  # a kept neuron belongs to each language whose p exceeds this quantile

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not 0.0 < value <= 1.0:
                raise UserError(f"{name} must be in (0, 1], got {value}")


@dataclass(frozen=True)
class LapeSelection:
    """What LAPE found: scores, the kept neurons, and which languages each belongs to."""

    probs: torch.Tensor  # [L, N, G] float64 activation probabilities
    entropy: torch.Tensor  # [L, N] float64 LAPE score; +inf for neurons that failed the filter
    selected: torch.Tensor  # [L, N] bool: the lowest-entropy top_rate of the candidates
    language_mask: torch.Tensor  # [G, L, N] bool: selected and p above the activation bar
    filter_threshold: float
    activation_bar: float


def activation_probabilities(over_zero: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """counts [L, N, G] of tokens with act > 0, over tokens seen per language [G] -> p [L, N, G] (float64)."""
    if over_zero.dim() != 3 or tokens.shape != over_zero.shape[-1:]:
        raise ValueError(f"counts {tuple(over_zero.shape)} do not match token totals {tuple(tokens.shape)}")
    if bool((tokens <= 0).any()):
        raise ValueError("every language needs at least one token")
    return over_zero.double() / tokens.double()


def lape_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy over languages of each neuron's L1-normalised activation probabilities (0·log 0 = 0)."""
    total = probs.sum(dim=-1, keepdim=True)
    normed = torch.where(total > 0, probs / total.clamp_min(torch.finfo(probs.dtype).tiny), 0.0)
    logs = torch.where(normed > 0, normed.clamp_min(torch.finfo(probs.dtype).tiny).log(), 0.0)
    return -(normed * logs).sum(dim=-1)


def quantile_value(values: torch.Tensor, ratio: float) -> float:
    """The reference's threshold: the round(n·ratio)-th smallest value (1-based, clamped to [1, n])."""
    flat = values.flatten()
    k = min(max(round(flat.numel() * ratio), 1), flat.numel())
    return float(flat.kthvalue(k).values)


def select_language_neurons(probs: torch.Tensor, options: LapeOptions | None = None) -> LapeSelection:
    """Pick language-specific neurons from activation probabilities [L, N, G].

    Like the reference: filter, then the round(L·N·top_rate) lowest-entropy neurons, each assigned to the
    languages whose p exceeds the activation bar. Two deliberate differences: ties in entropy go to the
    lower (layer, neuron) index (stable, so runs are reproducible), and neurons that failed the filter are
    never selected even when fewer candidates than the quota exist.
    """
    options = options or LapeOptions()
    probs = probs.double()
    num_layers, num_neurons, _ = probs.shape
    entropy = lape_entropy(probs)
    filter_threshold = quantile_value(probs, options.filter_rate)
    candidate = (probs > filter_threshold).any(dim=-1)
    entropy = torch.where(candidate, entropy, torch.inf)

    quota = min(round(num_layers * num_neurons * options.top_rate), int(candidate.sum()))
    order = torch.sort(entropy.flatten(), stable=True).indices[:quota]
    selected = torch.zeros(num_layers * num_neurons, dtype=torch.bool)
    selected[order] = True
    selected = selected.view(num_layers, num_neurons)

    activation_bar = quantile_value(probs, options.activation_bar_ratio)
    language_mask = (probs > activation_bar).permute(2, 0, 1) & selected
    return LapeSelection(probs, entropy, selected, language_mask, filter_threshold, activation_bar)
