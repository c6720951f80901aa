"""Which kept neurons a tensor-parallel rank owns, in its local numbering.

Neuron j of an MLP lives on the rank that owns intermediate index j, for gate, up and down alike: vLLM
splits gate_up_proj's outputs and down_proj's inputs into equal contiguous blocks per rank.
"""

from __future__ import annotations

import torch


def owned(
    idx: torch.Tensor, values: torch.Tensor, shard_size: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries of `idx` (global, sorted) in rank's block, renumbered from 0, with their value rows."""
    lo = rank * shard_size
    mine = (idx >= lo) & (idx < lo + shard_size)
    return idx[mine].long() - lo, values[mine]


def local_gate_up_rows(
    idx: list[torch.Tensor], rows: list[torch.Tensor], shard_size: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged gate_up: each half's owned rows, the up half offset by the rank's gate width."""
    parts = [owned(i, r, shard_size, rank) for i, r in zip(idx, rows, strict=True)]
    local = torch.cat([i + half * shard_size for half, (i, _) in enumerate(parts)])
    return local, torch.cat([r for _, r in parts])
