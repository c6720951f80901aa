"""The quantized vocabulary's CPU kernel as torch ops, so vLLM's compiled model graph (which holds the
embedding lookup) can trace it: `lape_awq::vocab_embedding` with a fake kernel for torch.compile. The logits
(computed outside the compiled graph) call the kernel directly. Where the kernel cannot be built, both run
the same formulas in torch."""

from __future__ import annotations

import torch

from lape_awq.kernels import cpu_vocab
from lape_awq.kernels.cpu_vocab import VocabCodes

# A fragment of the `lape_awq` namespace that cpu_sparse.py defines.
_LIBRARY = torch.library.Library("lape_awq", "FRAGMENT")
_LIBRARY.define(
    "vocab_embedding(Tensor ids, Tensor qweight, Tensor scales, Tensor zeros, Tensor slots, Tensor residual, "
    "int bits) -> Tensor"
)


def _vocab_embedding(
    ids: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    slots: torch.Tensor,
    residual: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    vocab = VocabCodes(qweight, scales, zeros, bits, slots, residual)
    if cpu_vocab.kernel_available():
        return cpu_vocab.vocab_embedding(ids, vocab)
    return cpu_vocab.reference_embedding(ids, vocab)


_LIBRARY.impl("vocab_embedding", _vocab_embedding, "CPU")


@torch.library.register_fake("lape_awq::vocab_embedding", lib=_LIBRARY)
def _(ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, *_rest: object) -> torch.Tensor:
    """[*ids.shape, H] in fp32, H from the codes' width and the group count."""
    bits = _rest[-1]
    return scales.new_empty((*ids.shape, qweight.shape[1] * 8 // bits))


def vocab_embedding(ids: torch.Tensor, vocab: VocabCodes) -> torch.Tensor:
    """The fp32 rows of `ids`: [*ids.shape, H]."""
    return torch.ops.lape_awq.vocab_embedding(
        ids, vocab.qweight, vocab.scales, vocab.zeros, vocab.slots, vocab.residual, vocab.bits
    )


def vocab_logits(x: torch.Tensor, vocab: VocabCodes) -> torch.Tensor:
    """x [..., H] @ W.T in fp32: [..., V]."""
    if cpu_vocab.kernel_available():
        return cpu_vocab.vocab_logits(x, vocab)
    return cpu_vocab.reference_logits(x, vocab)
