"""The CPU code-matrix kernel (kernels/cpu_codes.py) as torch ops, so vLLM's compiled model graph can trace
the embedding lookup and the W4 linears: `lape_awq::code_rows` and `lape_awq::code_linear`, each a plain
`Library.impl` (2 us of dispatch, against 13 us for `torch.library.custom_op`) with a fake kernel for
torch.compile. The LM head's logits (computed outside the compiled graph) call the kernel directly.
"""

from __future__ import annotations

import torch

from lape_awq.kernels import cpu_codes
from lape_awq.kernels.cpu_codes import CodeMatrix

_LIBRARY = torch.library.Library("lape_awq", "DEF")
# A CodeMatrix's fields, in its order.
_MATRIX = "Tensor qweight, Tensor scales, Tensor zeros, int bits, Tensor slots, Tensor residual"
_LIBRARY.define(f"code_rows(Tensor ids, {_MATRIX}) -> Tensor")
_LIBRARY.define(f"code_linear(Tensor x, {_MATRIX}, Tensor cols_idx, Tensor cols_values) -> Tensor")


def _code_rows(ids: torch.Tensor, *matrix: object) -> torch.Tensor:
    return cpu_codes.code_rows(ids, CodeMatrix(*matrix))  # type: ignore[arg-type]


def _code_linear(x: torch.Tensor, *args: object) -> torch.Tensor:
    *matrix, cols_idx, cols_values = args
    return cpu_codes.code_matmul(x, CodeMatrix(*matrix), cols_idx, cols_values)  # type: ignore[arg-type]


_LIBRARY.impl("code_rows", _code_rows, "CPU")
_LIBRARY.impl("code_linear", _code_linear, "CPU")


@torch.library.register_fake("lape_awq::code_rows", lib=_LIBRARY)
def _(
    ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, _zeros: object, bits: int, *_rest: object
) -> torch.Tensor:
    """[*ids.shape, K] in fp32; K from the codes' width and bits."""
    return scales.new_empty((*ids.shape, qweight.shape[1] * 8 // bits))


@torch.library.register_fake("lape_awq::code_linear", lib=_LIBRARY)
def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, *_rest: object) -> torch.Tensor:
    """[..., N] in fp32; N the codes' rows."""
    return scales.new_empty((*x.shape[:-1], qweight.shape[0]))


def _matrix(m: CodeMatrix) -> tuple:
    return m.qweight, m.scales, m.zeros, m.bits, m.slots, m.residual


def code_rows(ids: torch.Tensor, m: CodeMatrix) -> torch.Tensor:
    """The fp32 rows `ids` of W: [*ids.shape, K] (the embedding lookup)."""
    return torch.ops.lape_awq.code_rows(ids, *_matrix(m))


def code_linear(
    x: torch.Tensor, m: CodeMatrix, cols_idx: torch.Tensor, cols_values: torch.Tensor
) -> torch.Tensor:
    """x @ W.T in fp32, plus the kept input channels' term (`cols_idx` empty: none): [..., N]."""
    return torch.ops.lape_awq.code_linear(x, *_matrix(m), cols_idx, cols_values)
