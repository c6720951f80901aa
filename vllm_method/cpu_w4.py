"""The dense W4 part on CPU through vLLM's own W4A16 GEMM (`cpu_gemm_wna16`, the op stock vLLM AWQ uses).

That op wants standard nibble order, the weight packed along N in blocks of 16 output channels, scales in
the activation dtype, and fp16/bf16 activations only: fp32 activations (Gemma 3 on CPU) are run through
it in fp16, which holds the fp16-stored scales exactly.
"""

from __future__ import annotations

import torch

from lape_awq.kernels.awq_packing import unpack_int4

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def _pack_standard(codes: torch.Tensor) -> torch.Tensor:
    """[rows, cols] codes -> int32 [rows, cols/8], nibble i holding column 8c + i."""
    rows, cols = codes.shape
    return (codes.to(torch.int32).view(rows, cols // 8, 8) << _SHIFTS).sum(-1, dtype=torch.int32)


def awq_to_cpu_layout(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoAWQ qweight [K, N/8] and qzeros [G, N/8] -> the op's q_weight [N/16, 2K] and zeros [G, N/8]."""
    k_in = qweight.shape[0]
    packed = _pack_standard(unpack_int4(qweight))
    blocked = packed.view(k_in, -1, 2).permute(1, 0, 2).reshape(-1, 2 * k_in).contiguous()
    return blocked, _pack_standard(unpack_int4(qzeros)).contiguous()


def kernel_dtype(act_dtype: torch.dtype) -> torch.dtype:
    return act_dtype if act_dtype in KERNEL_DTYPES else torch.float16


def cpu_w4_gemm(
    x: torch.Tensor, q_weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> torch.Tensor:
    """x [M, K] @ dequant(W4) -> [M, N], all in the kernel's dtype (scales' dtype, fp16 or bf16)."""
    from vllm import _custom_ops as ops

    return ops.cpu_gemm_wna16(
        input=x, q_weight=q_weight, scales=scales, zeros=zeros, bias=None, pack_factor=8, isa_hint="vec"
    )


def cpu_w4_matmul(
    x: torch.Tensor, q_weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> torch.Tensor:
    """x [M, K] @ dequant(W4) -> [M, N] in x's dtype; scales already in kernel_dtype(x.dtype)."""
    return cpu_w4_gemm(x.to(scales.dtype), q_weight, scales, zeros).to(x.dtype)
