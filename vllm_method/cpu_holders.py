"""How a vLLM layer holds its CPU code matrix (kernels/cpu_codes.py): the tensors registered as the layer's
parameters, so the engine's memory accounting sees them, with the CodeMatrix a view of the same tensors."""

from __future__ import annotations

import functools
import logging

import torch

from lape_awq.kernels.cpu_codes import CodeMatrix, kernel_available

log = logging.getLogger(__name__)


def hold(layer: torch.nn.Module, matrix: CodeMatrix) -> CodeMatrix:
    """Register `matrix`'s tensors on `layer` (lape_codes_<field>) and return it."""
    for name, tensor in matrix.tensors().items():
        layer.register_parameter(f"lape_codes_{name}", torch.nn.Parameter(tensor, requires_grad=False))
    return matrix


@functools.cache
def warn_if_no_cpu_kernel() -> None:
    """Log once when the CPU kernel cannot be built: the same formulas then run in torch."""
    if not kernel_available():
        log.warning(
            "lape_awq: the CPU kernel could not be built here (a C++ compiler is needed once); W4 linears "
            "and the quantized vocabulary run through torch: the same outputs, slower"
        )
