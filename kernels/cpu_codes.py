"""The CPU kernel for matrices stored as grouped 4/8-bit codes, one row per output (cpu_codes.cpp): the
quantized vocabulary (rows = tokens: the embedding lookup and the LM head's logits) and, converted from the
AutoAWQ layout at load, the decoder's W4 linears (rows = output channels), all computed in fp32.

The C++ source is compiled on first use with the machine's compiler for the machine's own CPU
(`-march=native`: AVX-512 where there is one, else AVX2, else portable loops) and cached by torch under
$TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), keyed by the source, torch's version and the
CPU's flags, so a cache is never reused on another CPU. Compiling takes about a minute on 2 cores, once.

`CodeMatrix` is the runtime form (fp32 scales and zero points, a slot map for the kept rows);
`code_rows` and `code_matmul` run the kernel, or, where it cannot be built, `reference_rows` and
`reference_matmul`: the same formulas in torch (kernels/vocab_codes.py).
"""

from __future__ import annotations

import functools
import hashlib
import platform
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from lape_awq.kernels.awq_packing import unpack_int4
from lape_awq.kernels.sparse_correction import check_sparse_indices, slot_map
from lape_awq.kernels.vocab_codes import kept_dequantized_rows, pack_codes, packed_width

SOURCE = Path(__file__).with_name("cpu_codes.cpp")
# -fopenmp: at::parallel_for is OpenMP inlined into this module; at run time it binds to the libgomp.so.1
# torch has loaded (same soname), so the kernel uses torch's threads and vLLM's core binding.
# -ffp-contract=off: GCC would otherwise fuse `(q - z) * s + residual` into one FMA where the code leaves it
# to the compiler (the portable loops), and the lookup would no longer be bit-identical to the reference.
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off")


@dataclass(frozen=True)
class CodeMatrix:
    """A matrix W [N, K] of grouped codes (or one tensor-parallel shard of it) as the CPU kernel reads it."""

    qweight: torch.Tensor  # uint8 [N, K * bits / 8] (kernels/vocab_codes.py)
    scales: torch.Tensor  # float32 [N, K / g]
    zeros: torch.Tensor  # float32 [N, K / g]
    bits: int
    slots: torch.Tensor  # int32 [N] (-1: not kept), or empty
    residual: torch.Tensor  # float16 [k, K] as stored (added in fp32), or empty

    @classmethod
    def build(
        cls,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        bits: int,
        kept_idx: torch.Tensor | None = None,
        kept_rows: torch.Tensor | None = None,
    ) -> CodeMatrix:
        """From the stored tensors (uint8 qweight, zero points and fp16 scales [N, K / g]; kept rows as
        indices and fp16 residuals)."""
        rows, width = qweight.shape
        cols = width * 8 // bits
        if packed_width(cols, bits) != width or qzeros.shape != scales.shape or scales.shape[0] != rows:
            raise ValueError(
                f"code tensors do not fit: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                f"scales {tuple(scales.shape)} at {bits} bits"
            )
        slots, residual = torch.empty(0, dtype=torch.int32), torch.empty(0, cols, dtype=torch.float16)
        if kept_idx is not None and kept_rows is not None and kept_idx.numel():
            if kept_rows.shape != (kept_idx.numel(), cols):
                raise ValueError(
                    f"kept rows of shape {tuple(kept_rows.shape)} for {kept_idx.numel()} x {cols}"
                )
            # The kernel trusts every slot to be < k: a map built here from checked indices is.
            slots = slot_map(check_sparse_indices(kept_idx, rows, "kept rows"), rows)
            residual = kept_rows.half().contiguous()
        scales, zeros = scales.float().contiguous(), qzeros.float().contiguous()
        return cls(qweight.contiguous(), scales, zeros, bits, slots, residual)

    @classmethod
    def from_awq(
        cls,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        kept_idx: torch.Tensor | None = None,
        kept_rows: torch.Tensor | None = None,
    ) -> CodeMatrix:
        """A W4 linear from AutoAWQ's gemm tensors (qweight [K, N/8], qzeros [K/g, N/8], scales [K/g, N]):
        row n is output channel n; kept rows are kept output channels (gate/up)."""
        codes = pack_codes(unpack_int4(qweight).T, 4)
        zeros = unpack_int4(qzeros).T.to(torch.uint8)
        return cls.build(codes, zeros, scales.T, 4, kept_idx, kept_rows)

    @property
    def cols(self) -> int:
        return self.qweight.shape[1] * 8 // self.bits

    def kept(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept row indices (sorted) and their residuals [k, K]."""
        if not self.slots.numel():
            return torch.empty(0, dtype=torch.long), self.residual
        idx = (self.slots >= 0).nonzero()[:, 0]
        return idx, self.residual[self.slots[idx].long()]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The runtime tensors by field name (for holders that register them)."""
        return {name: getattr(self, name) for name in ("qweight", "scales", "zeros", "slots", "residual")}


def _cpu_key() -> str:
    """What the compiled code depends on besides its source: the CPU's features and torch."""
    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    return f"{platform.machine()}|{flags}|{torch.__version__}|{' '.join(CFLAGS)}"


@functools.cache
def extension() -> ModuleType:
    """The compiled kernel module (built on first use, then loaded from torch's extension cache)."""
    from torch.utils.cpp_extension import load

    digest = hashlib.sha256(SOURCE.read_bytes() + _cpu_key().encode()).hexdigest()[:16]
    return load(
        name=f"lape_awq_cpu_codes_{digest}",
        sources=[str(SOURCE)],
        extra_cflags=list(CFLAGS),
        extra_ldflags=["-fopenmp"],
    )


@functools.cache
def kernel_available() -> bool:
    """Whether the kernel compiles and loads here (a C++ compiler is needed once)."""
    try:
        extension()
    except (OSError, RuntimeError, ImportError, ValueError):
        return False
    return True


def _args(m: CodeMatrix) -> tuple:
    return m.qweight, m.scales, m.zeros, m.slots, m.residual, m.bits


NO_COLUMNS = (torch.empty(0, dtype=torch.long), torch.empty(0, 0))


def code_rows(ids: torch.Tensor, m: CodeMatrix) -> torch.Tensor:
    """Rows `ids` (any shape, int) of W in fp32: [*ids.shape, K] (the embedding lookup)."""
    if not kernel_available():
        return reference_rows(ids, m)
    rows = extension().code_rows(ids.reshape(-1).long().contiguous(), *_args(m))
    return rows.view(*ids.shape, m.cols)


def code_matmul(
    x: torch.Tensor,
    m: CodeMatrix,
    cols_idx: torch.Tensor | None = None,
    cols_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] @ W.T in fp32 (x is read in fp32): [..., N]; plus x[..., cols_idx] @ cols_values (fp32
    [c, N]) where given: a W4 linear's kept input channels (down_proj)."""
    flat = x.reshape(-1, x.shape[-1]).float().contiguous()
    idx, values = NO_COLUMNS if cols_idx is None or cols_values is None else (cols_idx, cols_values)
    if kernel_available():
        y = extension().code_matmul(flat, *_args(m), idx.long(), values.float().contiguous())
    else:
        y = reference_matmul(flat, m)
        if idx.numel():
            y += flat[:, idx.long()] @ values.float()
    return y.view(*x.shape[:-1], y.shape[-1])


def _dequantized(m: CodeMatrix, rows: torch.Tensor | None) -> torch.Tensor:
    return kept_dequantized_rows(m.qweight, m.zeros, m.scales, m.bits, rows, m.slots, m.residual)


def reference_rows(ids: torch.Tensor, m: CodeMatrix) -> torch.Tensor:
    """`code_rows` in torch."""
    return _dequantized(m, ids.reshape(-1).long()).view(*ids.shape, m.cols)


# Rows dequantized at a time by `reference_matmul`: 16k x 640 fp32 is 40 MiB.
_REFERENCE_CHUNK = 16384


def reference_matmul(x: torch.Tensor, m: CodeMatrix) -> torch.Tensor:
    """`code_matmul` in torch, dequantizing a chunk of rows at a time."""
    flat = x.reshape(-1, x.shape[-1]).float()
    rows = m.qweight.shape[0]
    out = torch.empty(flat.shape[0], rows)
    for start in range(0, rows, _REFERENCE_CHUNK):
        chunk = torch.arange(start, min(start + _REFERENCE_CHUNK, rows))
        out[:, chunk] = flat @ _dequantized(m, chunk).T
    return out.view(*x.shape[:-1], rows)
