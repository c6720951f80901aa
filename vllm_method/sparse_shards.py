"""Which kept neurons (and kept vocabulary rows) a tensor-parallel rank owns, in its local numbering.

Neuron j of an MLP lives on the rank that owns intermediate index j, for gate, up and down alike: vLLM
splits gate_up_proj's outputs and down_proj's inputs into equal contiguous blocks per rank.
"""

from __future__ import annotations

import torch

from lape_awq.vllm_method.config import CheckpointError


def load_whole(param: torch.nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
    """vLLM weight loader for a kept-channel tensor: every rank loads it whole (shard_id: gate_up's half)."""
    target = param.data if shard_id is None else param.data[shard_id]
    if target.shape != loaded.shape:
        raise CheckpointError(
            f"sparse tensor of shape {tuple(loaded.shape)} where {tuple(target.shape)} was expected"
        )
    target.copy_(loaded)


def in_range(idx: torch.Tensor, values: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries of `idx` (global, sorted) in [lo, hi), renumbered from 0, with their value rows."""
    mine = (idx >= lo) & (idx < hi)
    return idx[mine].long() - lo, values[mine]


def owned(
    idx: torch.Tensor, values: torch.Tensor, shard_size: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries of `idx` (global, sorted) in rank's block, renumbered from 0, with their value rows."""
    return in_range(idx, values, rank * shard_size, (rank + 1) * shard_size)


def local_gate_up_rows(
    idx: list[torch.Tensor], rows: list[torch.Tensor], shard_size: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged gate_up: each half's owned rows, the up half offset by the rank's gate width."""
    parts = [owned(i, r, shard_size, rank) for i, r in zip(idx, rows, strict=True)]
    local = torch.cat([i + half * shard_size for half, (i, _) in enumerate(parts)])
    return local, torch.cat([r for _, r in parts])
