"""Fused W4 dequant-GEMM with the sparse FP16 correction: y = x @ (dequant(W4) + S) (+ bias).

W4 is [K, N] (in x out, as the checkpoint stores it) and S is zero except in the kept channels, where it
holds their FP16 residuals (kept output columns n for gate/up, kept input rows k for down).

The weight is read as stored (AutoAWQ gemm: qweight int32 [K, N/8], qzeros int32 [K/g, N/8], scales
[K/g, N]) and dequantized in registers; kept channels get their FP16 residual added to the weight tile in
the same loop (see sparse_correction.py), so a plain AWQ call (no correction) and an AWQ-opt call run the
same kernel. One kernel body, two regimes picked by M (w4_configs.py): decode splits K across programs
(partials reduced by a second small kernel) so a few tokens still stream the weight at full bandwidth;
prefill tiles M x N with `tl.dot`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lape_awq.kernels.sparse_correction import SparseCorrection
from lape_awq.kernels.w4_configs import KernelConfig, hopper_autotune_configs, pick_config

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GROUP_SIZES = (32, 64, 128)
_SPARSE_MODE = {None: 0, "rows": 1, "cols": 2}


@triton.jit
def _round_to_bf16(v):
    """fp32 -> the nearest bf16 value (ties to even), still as fp32."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _w4_gemm_kernel(
    x_ptr,
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    bias_ptr,
    slots_ptr,
    values_ptr,
    out_ptr,
    M,
    N,
    K,
    K_PER_SPLIT,
    GROUP_SIZE: tl.constexpr,
    SPARSE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Axis 0 walks M so programs running side by side share a weight tile (L2 reuse in prefill).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    packs = N // 8
    # AWQ order 0,2,4,6,1,3,5,7: column j of a pack sits in nibble (j % 2) * 4 + j // 2.
    shifts = ((offs_n % 2) * 4 + (offs_n % 8) // 2) * 4
    if SPARSE == 1:
        slot_n = tl.load(slots_ptr + offs_n, mask=n_mask, other=-1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    # K_PER_SPLIT and K are multiples of the group size and BLOCK_K divides it: every K tile is full
    # and lies inside one quantization group.
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_mask[:, None], other=0.0)
        q = tl.load(qweight_ptr + offs_k[:, None] * packs + (offs_n // 8)[None, :], mask=n_mask[None, :])
        group = k0 // GROUP_SIZE
        z = tl.load(qzeros_ptr + group * packs + offs_n // 8, mask=n_mask)
        s = tl.load(scales_ptr + group * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        codes = (q >> shifts[None, :]) & 0xF
        zeros = (z >> shifts) & 0xF
        w = (codes - zeros[None, :]).to(tl.float32) * s[None, :]
        if SPARSE == 1:
            kept = tl.load(
                values_ptr + slot_n[None, :] * K + offs_k[:, None], mask=(slot_n >= 0)[None, :], other=0.0
            )
            w += kept.to(tl.float32)
        if SPARSE == 2:
            slot_k = tl.load(slots_ptr + offs_k)
            kept = tl.load(
                values_ptr + slot_k[:, None] * N + offs_n[None, :],
                mask=(slot_k >= 0)[:, None] & n_mask[None, :],
                other=0.0,
            )
            w += kept.to(tl.float32)
        if EMULATE_BF16:
            acc += tl.dot(x.to(tl.float32), _round_to_bf16(w), input_precision="ieee")
        elif x.dtype == tl.float32:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if EMULATE_BF16:
            acc = _round_to_bf16(acc)
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), out_mask)
    else:
        partial = out_ptr + pid_k * M * N
        tl.store(partial + offs_m[:, None] * N + offs_n[None, :], acc, out_mask)


@triton.jit
def _split_k_reduce_kernel(
    partial_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(SPLIT_K):
        acc += tl.load(partial_ptr + split * M * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    if EMULATE_BF16:
        acc = _round_to_bf16(acc)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask)


_w4_gemm_autotuned = triton.autotune(
    configs=hopper_autotune_configs(),
    key=["N", "K", "GROUP_SIZE", "SPARSE", "SPLIT_K", "BLOCK_M"],
    prune_configs_by={
        "early_config_prune": lambda configs, named_args, **kw: [
            c
            for c in configs
            if c.kwargs["BLOCK_K"] <= kw.get("GROUP_SIZE", named_args.get("GROUP_SIZE", 128))
        ]
    },
)(_w4_gemm_kernel)


def _check(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
    sparse: SparseCorrection | None,
) -> tuple[int, int]:
    """ValueError for anything the kernel cannot take; returns (K, N)."""
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous")
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or not qweight.is_contiguous():
        raise ValueError(
            f"qweight must be a contiguous int32 [K, N/8], got {qweight.dtype} {list(qweight.shape)}"
        )
    k_in, n_out = qweight.shape[0], qweight.shape[1] * 8
    if x.shape[-1] != k_in:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {k_in}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size {group_size} not supported (one of {GROUP_SIZES})")
    if k_in % group_size:
        raise ValueError(f"K = {k_in} is not divisible by the group size {group_size}")
    groups = k_in // group_size
    if (
        qzeros.dtype != torch.int32
        or tuple(qzeros.shape) != (groups, n_out // 8)
        or not qzeros.is_contiguous()
    ):
        raise ValueError(
            f"qzeros must be a contiguous int32 [{groups}, {n_out // 8}], "
            f"got {qzeros.dtype} {list(qzeros.shape)}"
        )
    if scales.dtype not in ACT_DTYPES or tuple(scales.shape) != (groups, n_out) or not scales.is_contiguous():
        raise ValueError(
            f"scales must be a contiguous float [{groups}, {n_out}], got {scales.dtype} {list(scales.shape)}"
        )
    if bias is not None and (tuple(bias.shape) != (n_out,) or bias.dtype not in ACT_DTYPES):
        raise ValueError(f"bias must be a float [{n_out}], got {bias.dtype} {list(bias.shape)}")
    if sparse is not None:
        sparse.check_shapes(k_in, n_out)
    tensors = [qweight, qzeros, scales, bias] + ([sparse.slots, sparse.values] if sparse else [])
    if any(t is not None and t.device != x.device for t in tensors):
        raise ValueError(f"all tensors must be on {x.device}")
    return k_in, n_out


def w4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    sparse: SparseCorrection | None = None,
    *,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """`x @ W + bias + sparse term` for x [..., K] -> [..., N] in x's dtype, W as stored by the checkpoint.

    `out` ([M, N], x's dtype) and `workspace` (fp32, at least [split_k, M, N]) may be given to reuse
    memory; `config` overrides the dispatcher (benchmarks, tests).
    """
    k_in, n_out = _check(x, qweight, qzeros, scales, group_size, bias, sparse)
    x2 = x.reshape(-1, k_in)
    m = x2.shape[0]
    if out is None:
        out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n_out) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} [{m}, {n_out}]")
    if m == 0:
        return out.view(*x.shape[:-1], n_out)
    autotune = config is None and _use_autotune(x.device)
    cfg = config or pick_config(m, n_out, k_in, group_size, x.device)
    k_per_split = triton.cdiv(k_in // group_size, cfg.split_k) * group_size
    split_k = triton.cdiv(k_in, k_per_split)
    if split_k > 1:
        if workspace is None:
            workspace = torch.empty((split_k, m, n_out), dtype=torch.float32, device=x.device)
        elif workspace.dtype != torch.float32 or workspace.numel() < split_k * m * n_out:
            raise ValueError(f"workspace must be fp32 with at least {split_k * m * n_out} elements")
    # Triton's interpreter (the only way to run on CPU tensors) gets bf16 arithmetic wrong and converts
    # fp32 -> bf16 by truncation: there bf16 runs as fp32 math on bf16-rounded values, as the GPU computes.
    emulate_bf16 = x.device.type == "cpu" and x.dtype == torch.bfloat16
    target = out if split_k == 1 else workspace
    dummy = qzeros  # never read: stands in for absent optional tensors
    args = (
        x2,
        qweight,
        qzeros,
        scales,
        dummy if bias is None else bias,
        dummy if sparse is None else sparse.slots,
        dummy if sparse is None else sparse.values,
        target,
        m,
        n_out,
        k_in,
        k_per_split,
    )
    meta = dict(
        GROUP_SIZE=group_size,
        SPARSE=_SPARSE_MODE[None if sparse is None else sparse.kind],
        HAS_BIAS=bias is not None,
        SPLIT_K=split_k,
        EMULATE_BF16=emulate_bf16,
        BLOCK_M=cfg.block_m,
    )
    if autotune:
        grid = lambda meta_: (triton.cdiv(m, cfg.block_m), triton.cdiv(n_out, meta_["BLOCK_N"]), split_k)  # noqa: E731
        _w4_gemm_autotuned[grid](*args, **meta)
    else:
        grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n_out, cfg.block_n), split_k)
        _w4_gemm_kernel[grid](
            *args,
            **meta,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    if split_k > 1:
        block = 1024
        _split_k_reduce_kernel[(triton.cdiv(m * n_out, block),)](
            workspace,
            dummy if bias is None else bias,
            out,
            m,
            n_out,
            SPLIT_K=split_k,
            HAS_BIAS=bias is not None,
            EMULATE_BF16=emulate_bf16,
            BLOCK=block,
        )
    return out.view(*x.shape[:-1], n_out)


def _use_autotune(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
