"""The W4 + kept-neurons linear on CPU as one opaque torch op, `lape_awq::cpu_w4_sparse_linear`.

Opaque, so that torch.compile (vLLM compiles the model on CPU) does not functionalize the in-place
scatter into the GEMM's output into a copy of it; a plain `Library.impl` rather than
`torch.library.custom_op`, whose Python dispatch costs 13 us against 2 us per call. The op works in the
GEMM's dtype (fp16 / bf16): the conversions from and to fp32 activations stay outside, in the compiled
graph, where they fuse with the neighbouring norm and activation as on the plain AWQ path. The term
itself is computed in fp32: on this CPU (Zen 4) torch's fp16 `index_add_` took 52 ms and a
[2048, 20] x [20, 2048] fp16 matmul 165 ms at a 2048-token Llama-0.4B prefill, against 0.6 ms and 5 ms
for the fp32 forms.
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
    x: torch.Tensor, q_weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    idx: torch.Tensor, values: torch.Tensor, rows: bool,
) -> torch.Tensor:  # fmt: skip
    y = cpu_w4_gemm(x, q_weight, scales, zeros)  # a fresh tensor: the term is added in place
    add_sparse_term(y, x, idx, values, rows)
    return y


_LIBRARY.impl("cpu_w4_sparse_linear", _cpu_w4_sparse_linear, "CPU")


@torch.library.register_fake("lape_awq::cpu_w4_sparse_linear", lib=_LIBRARY)
def _(
    x: torch.Tensor, q_weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    idx: torch.Tensor, values: torch.Tensor, rows: bool,
) -> torch.Tensor:  # fmt: skip
    return x.new_empty((*x.shape[:-1], scales.shape[1]))


def cpu_w4_sparse_linear(
    x: torch.Tensor, q_weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    idx: torch.Tensor, values: torch.Tensor, rows: bool,
) -> torch.Tensor:  # fmt: skip
    """x [M, K] @ (dequant(W4) + kept neurons).T in x's dtype (see add_sparse_term for `rows`)."""
    y = torch.ops.lape_awq.cpu_w4_sparse_linear(
        x.to(scales.dtype), q_weight, scales, zeros, idx, values, rows
    )
    return y.to(x.dtype)
