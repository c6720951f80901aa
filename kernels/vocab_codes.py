"""The quantized vocabulary (embedding / LM head) as the checkpoint stores it and the kernels read it, and its
formula in plain torch (the oracle the CPU kernel and the vLLM method are tested against).

One row per token, groups of `group_size` along the hidden dimension H, asymmetric integer codes:
  qweight uint8   [V, H * bits / 8]  8 bits: byte k is code k. 4 bits: each block of 32 codes is 16 bytes,
                                     byte j holding code 32b + j in its low nibble and code 32b + 16 + j in
                                     its high nibble (llama.cpp's Q4_0 order: one 16-byte load unpacks into
                                     two runs of 16 consecutive codes)
  qzeros  uint8   [V, H / g]         zero points
  scales  float16 [V, H / g]
  W[v, k] = (q[v, k] - z[v, k // g]) * s[v, k // g]
Kept rows (the rows form of the MLP's sparse part): `sparse_idx` int32 [k] and FP16 residuals [k, H] that
make those rows exact: W[idx[i]] += residual[i].
"""

from __future__ import annotations

import torch

from lape_awq.kernels.awq_packing import pack_int4

VOCAB_BITS = (4, 8)
BLOCK = 32  # 4-bit codes are packed in blocks of 32 (16 bytes)


def check_bits(bits: int) -> None:
    if bits not in VOCAB_BITS:
        raise ValueError(f"vocabulary codes are 4 or 8 bits, got {bits}")


def packed_width(hidden: int, bits: int) -> int:
    """Bytes per row of `qweight`."""
    check_bits(bits)
    if bits == 4 and hidden % BLOCK:
        raise ValueError(f"4-bit vocabulary rows need a hidden size that is a multiple of {BLOCK}: {hidden}")
    return hidden * bits // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes [V, H] (0 .. 2**bits - 1) -> uint8 qweight [V, H * bits / 8]."""
    rows, hidden = codes.shape
    packed_width(hidden, bits)
    c = codes.to(torch.uint8)
    if bits == 8:
        return c.contiguous()
    blocks = c.reshape(rows, hidden // BLOCK, 2, BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(rows, hidden // 2).contiguous()


def unpack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 qweight [V, H * bits / 8] -> int32 codes [V, H]."""
    check_bits(bits)
    q = qweight.to(torch.int32)
    if bits == 8:
        return q
    rows, width = q.shape
    blocks = q.reshape(rows, width // (BLOCK // 2), BLOCK // 2)
    return torch.stack((blocks & 0xF, blocks >> 4), dim=2).reshape(rows, width * 2)


def dequantize_rows(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dense rows [len(rows) or V, H] in the dtype of `scales` (all rows when `rows` is None)."""
    if rows is not None:
        qweight, qzeros, scales = qweight[rows], qzeros[rows], scales[rows]
    q = unpack_codes(qweight, bits).to(scales.dtype)
    group = q.shape[1] // scales.shape[1]
    return (q - qzeros.to(scales.dtype).repeat_interleave(group, 1)) * scales.repeat_interleave(group, 1)


def kept_dequantized_rows(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    rows: torch.Tensor | None,
    slots: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """`dequantize_rows`, plus each kept row's residual: `slots` (the slot map over all V rows, -1 where a
    row is not kept; None or empty: no kept rows) indexes `residual` [k, H]."""
    w = dequantize_rows(qweight, qzeros, scales, bits, rows)
    if slots is not None and slots.numel():
        slot = slots if rows is None else slots[rows]
        kept = slot >= 0
        w[kept] += residual[slot[kept].long()].to(w.dtype)
    return w


def dense_vocab(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    sparse_idx: torch.Tensor | None = None,
    sparse_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The effective weight [V, H] in the dtype of `scales`: the dequantized codes plus the kept residuals."""
    w = dequantize_rows(qweight, qzeros, scales, bits)
    if sparse_idx is not None and sparse_rows is not None and sparse_idx.numel():
        w[sparse_idx.long()] += sparse_rows.to(w.dtype)
    return w


def to_awq_gemm(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 4-bit vocabulary as the W4 kernel's linear (in = H, out = V; kernels/awq_packing.py): qweight int32
    [H, V/8], qzeros int32 [H/g, V/8], scales fp16 [H/g, V]. V must be a multiple of 8."""
    codes = unpack_codes(qweight, 4)
    return pack_int4(codes.T), pack_int4(qzeros.to(torch.int32).T), scales.half().T.contiguous()
