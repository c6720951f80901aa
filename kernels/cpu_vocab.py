"""The quantized vocabulary's CPU kernel (cpu_vocab.cpp): embedding lookup and LM-head logits read straight
from the 4/8-bit codes, in fp32.

The C++ source is compiled on first use with the machine's compiler for the machine's own CPU
(`-march=native`: AVX-512 where there is one, plain loops elsewhere) and cached by torch under
$TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), keyed by the source, torch's version and the
CPU's flags, so a cache is never reused on another CPU. Compiling takes about a minute on 2 cores, once.

`VocabCodes` is the runtime form (fp32 scales and zeros, a slot map for the kept rows); `vocab_embedding`
and `vocab_logits` run the kernel, `reference_embedding` and `reference_logits` are the same formulas in
torch (kernels/vocab_codes.py) for where the kernel cannot be built.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from lape_awq.kernels.sparse_correction import slot_map
from lape_awq.kernels.vocab_codes import dequantize_rows, packed_width

SOURCE = Path(__file__).with_name("cpu_vocab.cpp")
# -fopenmp: at::parallel_for is OpenMP inlined into this module; at run time it binds to the libgomp.so.1
# torch has loaded (same soname), so the kernel uses torch's threads and vLLM's core binding.
CFLAGS = ("-O3", "-march=native", "-fopenmp")


@dataclass(frozen=True)
class VocabCodes:
    """A quantized vocabulary (or one tensor-parallel shard of it) as the CPU kernel reads it."""

    qweight: torch.Tensor  # uint8 [V, H * bits / 8]
    scales: torch.Tensor  # float32 [V, H / g]
    zeros: torch.Tensor  # float32 [V, H / g]
    bits: int
    slots: torch.Tensor  # int32 [V] (-1: not kept), or empty
    residual: torch.Tensor  # float16 [k, H] as stored (added in fp32), or empty

    @classmethod
    def build(
        cls,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        bits: int,
        sparse_idx: torch.Tensor | None = None,
        sparse_rows: torch.Tensor | None = None,
    ) -> VocabCodes:
        """From the checkpoint's tensors (uint8 qweight and qzeros, fp16 scales; kept rows as local indices
        and fp16 residuals)."""
        rows, width = qweight.shape
        hidden = width * 8 // bits
        if packed_width(hidden, bits) != width or qzeros.shape != scales.shape or scales.shape[0] != rows:
            raise ValueError(
                f"vocabulary tensors do not fit: qweight {tuple(qweight.shape)}, qzeros "
                f"{tuple(qzeros.shape)}, scales {tuple(scales.shape)} at {bits} bits"
            )
        empty_slots = torch.empty(0, dtype=torch.int32)
        slots, residual = empty_slots, torch.empty(0, hidden, dtype=torch.float16)
        if sparse_idx is not None and sparse_rows is not None and sparse_idx.numel():
            slots, residual = slot_map(sparse_idx, rows), sparse_rows.half().contiguous()
        return cls(
            qweight.contiguous(),
            scales.float().contiguous(),
            qzeros.float().contiguous(),
            bits,
            slots,
            residual,
        )

    @property
    def hidden(self) -> int:
        return self.qweight.shape[1] * 8 // self.bits

    def kept_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept row indices (sorted) and their residuals [k, H]."""
        if not self.slots.numel():
            return torch.empty(0, dtype=torch.long), self.residual
        idx = (self.slots >= 0).nonzero()[:, 0]
        return idx, self.residual[self.slots[idx].long()]


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
        name=f"lape_awq_cpu_vocab_{digest}",
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


def vocab_embedding(ids: torch.Tensor, vocab: VocabCodes) -> torch.Tensor:
    """The rows of token `ids` (any shape, int) in fp32: [*ids.shape, H]."""
    flat = ids.reshape(-1).long().contiguous()
    rows = extension().vocab_embedding(
        flat, vocab.qweight, vocab.scales, vocab.zeros, vocab.slots, vocab.residual, vocab.bits
    )
    return rows.view(*ids.shape, vocab.hidden)


def vocab_logits(x: torch.Tensor, vocab: VocabCodes) -> torch.Tensor:
    """x [..., H] @ W.T in fp32 (x is read in fp32): [..., V]."""
    flat = x.reshape(-1, x.shape[-1]).float().contiguous()
    logits = extension().vocab_logits(
        flat, vocab.qweight, vocab.scales, vocab.zeros, vocab.slots, vocab.residual, vocab.bits
    )
    return logits.view(*x.shape[:-1], logits.shape[-1])


def _reference_rows(vocab: VocabCodes, rows: torch.Tensor | None) -> torch.Tensor:
    w = dequantize_rows(vocab.qweight, vocab.zeros, vocab.scales, vocab.bits, rows)
    if vocab.slots.numel():
        slots = vocab.slots if rows is None else vocab.slots[rows]
        kept = slots >= 0
        w[kept] += vocab.residual[slots[kept].long()].float()
    return w


def reference_embedding(ids: torch.Tensor, vocab: VocabCodes) -> torch.Tensor:
    """`vocab_embedding` in torch."""
    return _reference_rows(vocab, ids.reshape(-1).long()).view(*ids.shape, vocab.hidden)


# Vocabulary rows dequantized at a time by `reference_logits`: 16k x 640 fp32 is 40 MiB.
_REFERENCE_CHUNK = 16384


def reference_logits(x: torch.Tensor, vocab: VocabCodes) -> torch.Tensor:
    """`vocab_logits` in torch, dequantizing a chunk of rows at a time."""
    flat = x.reshape(-1, x.shape[-1]).float()
    rows = vocab.qweight.shape[0]
    out = torch.empty(flat.shape[0], rows)
    for start in range(0, rows, _REFERENCE_CHUNK):
        chunk = torch.arange(start, min(start + _REFERENCE_CHUNK, rows))
        out[:, chunk] = flat @ _reference_rows(vocab, chunk).T
    return out.view(*x.shape[:-1], rows)
