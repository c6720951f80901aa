"""The dense W4 part on CPU through vLLM's own W4A16 GEMM (`cpu_gemm_wna16`, the op stock vLLM AWQ uses).

That op wants standard nibble order, the weight packed along N in blocks of 16 output channels, scales in
the activation dtype, and fp16/bf16 activations only: fp32 activations (Gemma 3 on CPU) are run through
it in fp16, which holds the fp16-stored scales exactly.

vLLM ships that op only in its AVX-512 kernel library; on a CPU without AVX-512 it loads an AVX2 library
that lacks it (`has_w4a16_gemm`), and the linear method falls back to a dense fp32 weight.
"""

from __future__ import annotations

import functools

import torch

from lape_awq.kernels.awq_packing import STANDARD_ORDER, dense_with_kept, pack_int4, unpack_int4

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def awq_to_cpu_layout(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoAWQ qweight [K, N/8] and qzeros [G, N/8] -> the op's q_weight [N/16, 2K] and zeros [G, N/8]."""
    k_in = qweight.shape[0]
    packed = pack_int4(unpack_int4(qweight), STANDARD_ORDER)
    blocked = packed.view(k_in, -1, 2).permute(1, 0, 2).reshape(-1, 2 * k_in).contiguous()
    return blocked, pack_int4(unpack_int4(qzeros), STANDARD_ORDER).contiguous()


@functools.cache
def has_w4a16_gemm() -> bool:
    """Whether vLLM's loaded CPU kernel library has `cpu_gemm_wna16` (its AVX-512 builds do, AVX2 not)."""
    from vllm.platforms import current_platform

    current_platform.import_kernels()  # idempotent; the engine has done it already
    try:
        torch.ops._C.cpu_gemm_wna16  # noqa: B018  (looking the op up is the test)
    except (AttributeError, RuntimeError):
        return False
    return True


def dense_weight(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    idx: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    rows: bool = True,
) -> torch.Tensor:
    """The effective weight in fp32, [out, in] as `F.linear` takes it: dequantized W4 plus the kept
    neurons' residuals (rows: output channels `idx` get `values` [k, in]; else input channels `idx` get
    `values` [k, out])."""
    return dense_with_kept(qweight, qzeros, scales.float(), group_size, idx, values, rows).T.contiguous()


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
