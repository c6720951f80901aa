"""The W4 + kept-neurons linear on CPU as one opaque torch op, `lape_awq::cpu_w4_sparse_linear`.

Measured in interleaved A/B runs of Gemma 3 270M (fp32) on this CPU, AWQ-opt / AWQ at a 2048-token
prefill: 0.942 with the term written inline in the compiled model, 0.92-0.93 with an opaque op that also
did the fp32 <-> fp16 conversions, 0.988 with this op, which works in the GEMM's dtype and leaves the
conversions to the compiled graph (where they fuse with the neighbouring norm and activation, as on the
plain AWQ path). A plain `Library.impl` costs 2 us of dispatch per call; `torch.library.custom_op` 13 us.
The term itself is computed in fp32: torch's fp16 `index_add_` took 52 ms and a [2048, 20] x [20, 2048]
fp16 matmul 165 ms at a 2048-token Llama-0.4B prefill, against 0.6 ms and 5 ms for the fp32 forms.
"""

from __future__ import annotations

import torch

from lape_awq.vllm_method.cpu_w4 import cpu_w4_gemm

_LIBRARY = torch.library.Library("lape_awq", "DEF")
_LIBRARY.define(
    "cpu_w4_sparse_linear(Tensor x, Tensor q_weight, Tensor scales, Tensor zeros, Tensor idx, "
    "Tensor values, bool rows) -> Tensor"
)


def add_sparse_term(
    y: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, rows: bool
) -> None:
    """rows (gate/up): y[:, idx] += x @ values.T; else (down): y += x[:, idx] @ values. x, y: 2-D."""
    weights = values.float()
    if rows:
        kept = y.index_select(-1, idx).float().addmm_(x.float(), weights.T)
        y.index_copy_(-1, idx, kept.to(y.dtype))
    else:
        y.add_((x.index_select(-1, idx).float() @ weights).to(y.dtype))


def _cpu_w4_sparse_linear(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    idx: torch.Tensor,
    values: torch.Tensor,
    rows: bool,
) -> torch.Tensor:
    y = cpu_w4_gemm(x, q_weight, scales, zeros)  # a fresh tensor: the term is added in place
    add_sparse_term(y, x, idx, values, rows)
    return y


_LIBRARY.impl("cpu_w4_sparse_linear", _cpu_w4_sparse_linear, "CPU")


@torch.library.register_fake("lape_awq::cpu_w4_sparse_linear", lib=_LIBRARY)
def _(x: torch.Tensor, _q_weight: torch.Tensor, scales: torch.Tensor, *_sparse: object) -> torch.Tensor:
    """The output's shape for torch.compile: [M, N], N the scales' width."""
    return x.new_empty((*x.shape[:-1], scales.shape[1]))


def cpu_w4_sparse_linear(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    idx: torch.Tensor,
    values: torch.Tensor,
    rows: bool,
) -> torch.Tensor:
    """x [M, K] @ (dequant(W4) + kept neurons).T in x's dtype (see add_sparse_term for `rows`)."""
    y = torch.ops.lape_awq.cpu_w4_sparse_linear(
        x.to(scales.dtype), q_weight, scales, zeros, idx, values, rows
    )
    return y.to(x.dtype)
