"""Matrices of grouped codes (the quantized vocabulary, and the decoder's W4 linears on CPU): the storage
layout (bit-exact against a slow, obvious packer), and the CPU kernel (kernels/cpu_codes.cpp, compiled on
first use) against the formula in float64.

Tolerance, normwise: max|y - ref| <= 1e-5 * max|ref| for the fp32 products; the row lookup computes each
weight exactly as the torch reference does, so it must be bit-identical.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from lape_awq.kernels import cpu_codes
from lape_awq.kernels.cpu_codes import CodeMatrix
from lape_awq.kernels.vocab_codes import dense_vocab, pack_codes, to_awq_gemm, unpack_codes

LOGITS_TOLERANCE = 1e-5
# Up to 16 activation rows run straight from the codes (in passes of 8; one row in the group-sum form on
# AVX2), more go through tiles and the BLAS GEMM: one per task up to 128 rows, one shared tile past that.
M_VALUES = (1, 2, 3, 5, 8, 9, 16, 17, 40, 130)


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler: the torch formulas run instead")
def test_the_kernel_builds_where_there_is_a_compiler() -> None:
    """Otherwise every test below would quietly check the torch fallback against itself."""
    assert cpu_codes.kernel_available()


def slow_pack4(codes: list[list[int]]) -> list[list[int]]:
    """Per block of 32 codes, byte j = code 32b + j (low nibble) | code 32b + 16 + j (high nibble)."""
    out = []
    for row in codes:
        packed = []
        for b in range(len(row) // 32):
            block = row[32 * b : 32 * b + 32]
            packed.extend(block[j] | (block[16 + j] << 4) for j in range(16))
        out.append(packed)
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_matches_the_documented_layout_and_round_trips(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (5, 96), generator=gen)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 96 * bits // 8)
    expected = slow_pack4(codes.tolist()) if bits == 4 else codes.tolist()
    assert packed.tolist() == expected
    assert torch.equal(unpack_codes(packed, bits), codes.int())


def test_pack_refuses_a_hidden_size_off_the_block() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_codes(torch.zeros(2, 48, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="4 or 8 bits"):
        pack_codes(torch.zeros(2, 64, dtype=torch.int32), 3)


def random_vocab(
    rows: int, hidden: int, bits: int, group: int, kept: int, seed: int
) -> tuple[CodeMatrix, torch.Tensor]:
    """A random quantized vocabulary (kept rows include the first and last) and its float64 weight."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, hidden), generator=gen)
    qzeros = torch.randint(0, 2**bits, (rows, hidden // group), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(rows, hidden // group, generator=gen) / 20 + 1e-3).half()
    idx = rows_kept = None
    if kept:
        middle = torch.randperm(rows - 2, generator=gen)[: kept - 2] + 1
        idx = torch.cat([torch.tensor([0, rows - 1]), middle]).sort().values.int()
        rows_kept = torch.randn(kept, hidden, generator=gen).half()
    qweight = pack_codes(codes, bits)
    vocab = CodeMatrix.build(qweight, qzeros, scales, bits, idx, rows_kept)
    dense = dense_vocab(qweight, qzeros, scales.double(), bits, idx, rows_kept)
    return vocab, dense


CASES = {
    "4-bit-g128-kept": (1000, 256, 4, 128, 9),
    "4-bit-g32": (333, 64, 4, 32, 0),
    "8-bit-g64-kept": (515, 128, 8, 64, 3),
    "8-bit-g128": (260, 640, 8, 128, 0),
    "4-bit-g32-two-gemm-tiles": (4100, 64, 4, 32, 5),  # a shared GEMM tile holds 4,096 rows
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("m", M_VALUES)
def test_logits_match_float64(case: str, m: int) -> None:
    rows, hidden, bits, group, kept = CASES[case]
    vocab, dense = random_vocab(rows, hidden, bits, group, kept, seed=m)
    x = torch.randn(m, hidden, generator=torch.Generator().manual_seed(100 + m))
    got = cpu_codes.code_matmul(x, vocab)
    ref = x.double() @ dense.T
    assert got.dtype == torch.float32 and got.shape == (m, rows)
    err = (got.double() - ref).abs().max() / ref.abs().max()
    assert err <= LOGITS_TOLERANCE, f"normwise error {err:.2e}"
    assert torch.allclose(
        cpu_codes.reference_matmul(x, vocab).double(), ref, rtol=0, atol=1e-4 * ref.abs().max()
    )
    if kept:  # the kept rows' term is visible at this tolerance
        without = x.double() @ dense_vocab(*vocab_tensors(vocab), bits).T
        assert (without - ref).abs().max() > 100 * LOGITS_TOLERANCE * ref.abs().max()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 4])
def test_logits_of_activations_far_from_zero_mean_match_float64(bits: int, m: int) -> None:
    """One decode row sums q * x and z * sum(x) apart (the group-sum form): activations with a large mean
    (as after a GELU, or with an outlier channel) make those two terms large and nearly cancel, the case
    where that form could lose precision."""
    vocab, dense = random_vocab(700, 640, bits, 128, 5, seed=20 + bits)
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(m, 640, generator=gen) + 5.0
    x[:, 17] = 300.0
    ref = x.double() @ dense.T
    err = (cpu_codes.code_matmul(x, vocab).double() - ref).abs().max() / ref.abs().max()
    assert err <= LOGITS_TOLERANCE, f"normwise error {err:.2e}"


@pytest.mark.parametrize("m", [1, 40, 130])
def test_logits_in_inference_mode(m: int) -> None:
    """vLLM runs the model under torch.inference_mode(): the GEMM path's tasks write into the output from
    worker threads, which must run as the caller does."""
    vocab, dense = random_vocab(*CASES["4-bit-g32-two-gemm-tiles"], seed=3)
    x = torch.randn(m, 64, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        got = cpu_codes.code_matmul(x, vocab)
    assert got.is_inference()
    ref = x.double() @ dense.T
    assert (got.double() - ref).abs().max() <= LOGITS_TOLERANCE * ref.abs().max()


def vocab_tensors(vocab: CodeMatrix) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return vocab.qweight, vocab.zeros, vocab.scales.double()


@pytest.mark.parametrize("case", sorted(CASES))
def test_embedding_rows_are_exact(case: str) -> None:
    rows, hidden, bits, group, kept = CASES[case]
    vocab, _ = random_vocab(rows, hidden, bits, group, kept, seed=7)
    idx, _ = vocab.kept()
    ids = torch.tensor([[0, rows - 1, 5], [5, 1, rows // 2]])
    if idx.numel():
        ids[1, 2] = int(idx[len(idx) // 2])  # a kept row
    got = cpu_codes.code_rows(ids, vocab)
    assert got.shape == (2, 3, hidden) and got.dtype == torch.float32
    dense = dense_vocab(vocab.qweight, vocab.zeros, vocab.scales, bits, *vocab.kept())
    assert torch.equal(got, dense[ids])
    assert torch.equal(cpu_codes.reference_rows(ids, vocab), dense[ids])


def test_kernel_refuses_bad_inputs() -> None:
    vocab, _ = random_vocab(64, 64, 4, 32, 2, seed=3)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="outside"):
        cpu_codes.code_rows(torch.tensor([64]), vocab)
    with pytest.raises(RuntimeError, match="outside"):
        cpu_codes.code_rows(torch.tensor([-1]), vocab)
    ext = cpu_codes.extension()
    args = (vocab.qweight, vocab.scales, vocab.zeros, vocab.slots, vocab.residual)
    no_cols = cpu_codes.NO_COLUMNS
    with pytest.raises(RuntimeError, match="x must be"):
        ext.code_matmul(torch.randn(2, 32), *args, 4, *no_cols)
    with pytest.raises(RuntimeError, match="4 or 8 bits"):
        ext.code_matmul(x, *args, 3, *no_cols)
    with pytest.raises(RuntimeError, match="scales must be"):
        ext.code_matmul(x, vocab.qweight, vocab.scales.half(), *args[2:], 4, *no_cols)
    with pytest.raises(RuntimeError, match="cols_values must be"):
        ext.code_matmul(x, *args, 4, torch.tensor([1, 2]), torch.zeros(2, 63))
    with pytest.raises(RuntimeError, match="out of DATA bounds"):  # index_select's own check
        ext.code_matmul(x, *args, 4, torch.tensor([1, 64]), torch.zeros(2, 64))
    # The slot map is checked once, where it is built (the kernel trusts it on every call).
    codes = (vocab.qweight, vocab.zeros.to(torch.uint8), vocab.scales.half(), 4)
    with pytest.raises(ValueError, match="out of range"):
        CodeMatrix.build(*codes, torch.tensor([3, 64]), torch.zeros(2, 64))
    with pytest.raises(ValueError, match="sorted"):
        CodeMatrix.build(*codes, torch.tensor([9, 3]), torch.zeros(2, 64))
    with pytest.raises(ValueError, match="kept rows of shape"):
        CodeMatrix.build(*codes, torch.tensor([3, 9]), torch.zeros(3, 64))


@pytest.mark.parametrize("m", [1, 40])
def test_kept_columns_term_matches_float64(m: int) -> None:
    """A W4 linear's kept input channels (down_proj): x[:, idx] @ values added to x @ W.T, on the direct
    path and on the GEMM path; without it the result moves far beyond the tolerance."""
    vocab, dense = random_vocab(300, 128, 4, 64, 0, seed=11)
    gen = torch.Generator().manual_seed(12)
    idx, values = torch.tensor([0, 5, 127]), torch.randn(3, 300, generator=gen)
    x = torch.randn(m, 128, generator=gen)
    ref = x.double() @ dense.T + x[:, idx].double() @ values.double()
    got = cpu_codes.code_matmul(x, vocab, idx, values)
    assert (got.double() - ref).abs().max() <= LOGITS_TOLERANCE * ref.abs().max()
    assert (x.double() @ dense.T - ref).abs().max() > 100 * LOGITS_TOLERANCE * ref.abs().max()


def test_awq_gemm_form_of_a_4bit_vocabulary_is_the_same_weight() -> None:
    from lape_awq.kernels.awq_packing import dequantize

    vocab, dense = random_vocab(96, 64, 4, 32, 0, seed=5)
    qweight, qzeros, scales = to_awq_gemm(vocab.qweight, vocab.zeros.to(torch.uint8), vocab.scales.half())
    assert torch.equal(dequantize(qweight, qzeros, scales.double(), 32), dense.T)
