"""Each FFN neuron's sensitivity on a language: how far rounding its down_proj column to 4 bits moves the
MLP's output on that language's tokens, E[h_j^2] * ||W_down[:, j] - Q(W_down)[:, j]||^2 (h_j the neuron's
activation, the down projection's j-th input; Q round-to-nearest in the W4 group format). That is the
expected squared output error the column adds when the rounding errors of different columns are
uncorrelated: the loss keeping neuron j in FP16 saves, to first order. Its gate / up rows are left out
of the score: their rounding moves h_j itself, which the down column's error already scales with."""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from lape_awq.quant.architectures import architecture_of, decoder_layers
from lape_awq.quant.w4_math import quantize_groups


@torch.no_grad()
def neuron_sensitivity(
    model: nn.Module, batch: torch.Tensor, group_size: int, chunk_size: int = 4, progress: bool = True
) -> torch.Tensor:
    """[layers, neurons] float64 sensitivity of every FFN neuron of the float `model` on the token ids
    `batch` ([sequences, tokens]: one language's text)."""
    arch = architecture_of(model)
    layers = decoder_layers(model)
    downs = [layer.get_submodule(arch.mlp_linear("down_proj")) for layer in layers]
    energy = [torch.zeros(d.in_features, dtype=torch.float64) for d in downs]
    tokens = 0

    def hook(index: int):
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            energy[index] += args[0].double().pow(2).reshape(-1, args[0].shape[-1]).sum(0)

        return record

    handles = [d.register_forward_pre_hook(hook(i)) for i, d in enumerate(downs)]
    try:
        for chunk in tqdm(batch.split(chunk_size), desc="neuron sensitivity", disable=not progress):
            model(input_ids=chunk, use_cache=False)
            tokens += chunk.numel()
    finally:
        for handle in handles:
            handle.remove()
    scores = []
    for down, e in zip(downs, energy, strict=True):
        w = down.weight.float()
        error = (quantize_groups(w, group_size).dequantize().float() - w).double().pow(2).sum(0)
        scores.append(e / tokens * error)
    return torch.stack(scores)
