"""Which FFN neurons the -opt methods keep in FP16: a language's LAPE neurons, capped, or chosen by another
rule (`RULES`) within the same budget, or a random control."""

from __future__ import annotations

import torch

from lape_awq.quant.errors import UserError
from lape_awq.quant.lape.neurons_file import NeuronsFile


def language_neurons(nf: NeuronsFile, langs: list[str], max_neurons: int | None = None) -> list[torch.Tensor]:
    """Per layer, sorted int64 indices of the neurons of any of `langs`; with `max_neurons`, only that
    many, lowest LAPE entropy first (the most language-specific)."""
    mask = language_mask(nf, langs)
    if max_neurons is not None:
        if max_neurons < 0:
            raise UserError(f"--max-neurons must be >= 0, got {max_neurons}")
        return lowest_scoring(mask, torch.where(mask, nf.entropy, torch.inf), max_neurons)
    return [row.nonzero().flatten() for row in mask]


def language_mask(nf: NeuronsFile, langs: list[str]) -> torch.Tensor:
    """[layers, neurons] bool: the LAPE neurons of any of `langs`."""
    if not langs:
        raise UserError("give at least one --keep-lang")
    mask = torch.zeros_like(nf.entropy, dtype=torch.bool)
    for lang in langs:
        mask |= nf.mask(lang)
    return mask


# How the kept neurons are chosen within the budget (--max-neurons; default: as many as LAPE finds):
# lape: LAPE's neurons, the lowest entropy first; lape-deep: only those of the deeper half of the layers
# (the journal version of LAPE restricts to them); lape-sensitive: LAPE's neurons ranked by their
# sensitivity on the language's text (quant/lape/sensitivity.py; worth it with a neurons file of a larger
# --top-rate); sensitive: any neuron, ranked by sensitivity alone (the control without LAPE).
RULES = ("lape", "lape-deep", "lape-sensitive", "sensitive")
SENSITIVE_RULES = ("lape-sensitive", "sensitive")


def select_neurons(
    nf: NeuronsFile,
    langs: list[str],
    rule: str = "lape",
    max_neurons: int | None = None,
    sensitivity: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Per layer, sorted int64 indices of the kept neurons of `langs` by `rule` (`RULES`), at most
    `max_neurons` in all (None: as many as LAPE finds for `langs`); the sensitive rules need
    `sensitivity` ([layers, neurons], higher = keep first)."""
    if rule == "lape":
        return language_neurons(nf, langs, max_neurons)
    if rule not in RULES:
        raise UserError(f"unknown neuron rule {rule!r} (one of {', '.join(RULES)})")
    lape = language_mask(nf, langs)
    budget = int(lape.sum()) if max_neurons is None else max_neurons
    if budget < 0:
        raise UserError(f"--max-neurons must be >= 0, got {budget}")
    if rule == "lape-deep":
        lape[: nf.num_layers // 2] = False
        return lowest_scoring(lape, torch.where(lape, nf.entropy, torch.inf), budget)
    if sensitivity is None or sensitivity.shape != nf.entropy.shape:
        raise ValueError(f"rule {rule} needs a [layers, neurons] sensitivity like the neurons file's")
    candidates = lape if rule == "lape-sensitive" else torch.ones_like(lape)
    return lowest_scoring(candidates, torch.where(candidates, -sensitivity.double(), torch.inf), budget)


def lowest_scoring(mask: torch.Tensor, scores: torch.Tensor, budget: int) -> list[torch.Tensor]:
    """Per layer, sorted indices of the at most `budget` neurons of `mask` with the lowest `scores`."""
    order = torch.sort(scores.flatten(), stable=True).indices[: min(budget, int(mask.sum()))]
    chosen = torch.zeros(mask.numel(), dtype=torch.bool)
    chosen[order] = True
    return [row.nonzero().flatten() for row in chosen.view(mask.shape)]


def random_like(kept: list[torch.Tensor], num_neurons: int, seed: int) -> list[torch.Tensor]:
    """The control: as many neurons per layer as `kept`, chosen uniformly at random."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(num_neurons, generator=gen)[: k.numel()].sort().values for k in kept]
