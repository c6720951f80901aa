"""Count, per decoder layer and FFN neuron, the tokens on which act_fn(gate_proj(h)) > 0."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lape_awq.quant.model_loading import decoder_mlps


@torch.inference_mode()
def count_positive_activations(
    model: nn.Module, batches: Iterable[torch.Tensor], skip_first_position: bool
) -> tuple[torch.Tensor, int]:
    """Run the decoder (never the LM head) over `batches` of token ids.

    Returns counts [layers, neurons] (int64) and the number of tokens counted. With
    `skip_first_position` the leading <bos> of every sequence is run but not counted.
    """
    mlps = decoder_mlps(model)
    counts = torch.zeros(len(mlps), mlps[0].gate_proj.out_features, dtype=torch.int64)
    start = 1 if skip_first_position else 0

    def hook_for(i: int, mlp: nn.Module):
        def hook(_module: nn.Module, _inputs: tuple, gate: torch.Tensor) -> None:
            active = mlp.act_fn(gate[:, start:]) > 0
            counts[i] += active.sum(dim=(0, 1), dtype=torch.int64).cpu()

        return hook

    handles = [mlp.gate_proj.register_forward_hook(hook_for(i, mlp)) for i, mlp in enumerate(mlps)]
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
