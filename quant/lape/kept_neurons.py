"""Which FFN neurons AWQ-opt keeps in FP16: a language's LAPE neurons, capped, or a random control."""

from __future__ import annotations

import torch

from lape_awq.quant.errors import UserError
from lape_awq.quant.lape.neurons_file import NeuronsFile


def language_neurons(nf: NeuronsFile, langs: list[str], max_neurons: int | None = None) -> list[torch.Tensor]:
    """Per layer, sorted int64 indices of the neurons of any of `langs`; with `max_neurons`, only that
    many, lowest LAPE entropy first (the most language-specific)."""
    if not langs:
        raise UserError("give at least one --keep-lang")
    mask = torch.zeros_like(nf.entropy, dtype=torch.bool)
    for lang in langs:
        mask |= nf.mask(lang)
    if max_neurons is not None:
        if max_neurons < 0:
            raise UserError(f"--max-neurons must be >= 0, got {max_neurons}")
        scores = torch.where(mask, nf.entropy, torch.inf).flatten()
        order = torch.sort(scores, stable=True).indices[: min(max_neurons, int(mask.sum()))]
        mask = torch.zeros(mask.numel(), dtype=torch.bool)
        mask[order] = True
        mask = mask.view(nf.entropy.shape)
    return [row.nonzero().flatten() for row in mask]


def random_like(kept: list[torch.Tensor], num_neurons: int, seed: int) -> list[torch.Tensor]:
    """The control: as many neurons per layer as `kept`, chosen uniformly at random."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(num_neurons, generator=gen)[: k.numel()].sort().values for k in kept]
