"""Count, per decoder layer and FFN neuron, the tokens on which act_fn(gate(h)) > 0 (the architecture
table names gate and act_fn)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lape_awq.quant.architectures import architecture_of, decoder_layers


@torch.inference_mode()
def count_positive_activations(
    model: nn.Module, batches: Iterable[torch.Tensor], skip_first_position: bool
) -> tuple[torch.Tensor, int]:
    """Run the decoder (never the LM head) over `batches` of token ids.

    Returns counts [layers, neurons] (int64) and the number of tokens counted. With
    `skip_first_position` the leading <bos> of every sequence is run but not counted.
    """
    arch = architecture_of(model)
    activations = [arch.activation(layer) for layer in decoder_layers(model)]
    counts = torch.zeros(len(activations), activations[0][0].out_features, dtype=torch.int64)
    start = 1 if skip_first_position else 0

    def hook_for(i: int, act_fn: nn.Module):
        def hook(_module: nn.Module, _inputs: tuple, gate: torch.Tensor) -> None:
            active = act_fn(gate[:, start:]) > 0
            counts[i] += active.sum(dim=(0, 1), dtype=torch.int64).cpu()

        return hook

    handles = [gate.register_forward_hook(hook_for(i, act)) for i, (gate, act) in enumerate(activations)]
    decoder = model.model  # the stack without lm_head: on a 262k vocabulary the head costs more than it
    device = next(model.parameters()).device
    tokens = 0
    try:
        for batch in batches:
            decoder(input_ids=batch.to(device), use_cache=False)
            tokens += batch.shape[0] * (batch.shape[1] - start)
    finally:
        for h in handles:
            h.remove()
    return counts, tokens
