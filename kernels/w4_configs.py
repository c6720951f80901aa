"""Launch configurations of the W4 kernel: decode (small M, split-K) versus prefill (tiled), by M."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

DECODE_MAX_M = 32
# Programs the decode grid aims for per SM: enough in flight to hide the weight stream's latency.
_PROGRAMS_PER_SM = 2
# Without a GPU (the interpreter) a small pretend SM count still exercises split-K in tests.
_INTERPRETER_SMS = 4


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_SMS


def pick_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> KernelConfig:
    """The default config for an [m, k] x [k, n] W4 product (what non-Hopper GPUs and the interpreter run).

    Decode (m <= 32) is memory-bound: one or two 16-row tiles and K split until the grid fills the card.
    Prefill is compute-bound: large tiles for `tl.dot`, no split. BLOCK_K never exceeds the group size, so
    one K tile needs one row of scales and zeros.
    """
    if m <= DECODE_MAX_M:
        block_m, block_n = (16 if m <= 16 else 32), 64
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        groups = k // group_size
        split_k = max(1, min(groups, _PROGRAMS_PER_SM * _num_sms(device) // tiles, 16))
        return KernelConfig(block_m, block_n, min(128, group_size), split_k, num_warps=4, num_stages=3)
    block_m = 64 if m <= 64 else 128
    return KernelConfig(
        block_m, 128, min(64, group_size), 1, num_warps=8 if block_m == 128 else 4, num_stages=3
    )


def hopper_autotune_configs() -> list[triton.Config]:
    """Tile shapes autotuned on H100/H200 (BLOCK_M and split-K stay with the dispatcher; BLOCK_K larger than
    the group size is pruned at launch)."""
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn in (64, 128, 256)
        for bk in (32, 64, 128)
        for w, s in ((4, 3), (4, 4), (8, 3), (8, 4))
        if not (bn == 256 and w == 4)
    ]
