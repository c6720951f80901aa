"""AWQ gemm packing: bit-exact against a slow, obvious implementation; the float reference linear."""

from __future__ import annotations

import pytest
import torch

from lape_awq.kernels.awq_packing import AWQ_ORDER, dequantize, pack_int4, unpack_int4, w4_sparse_linear


def slow_pack(codes: list[list[int]]) -> list[list[int]]:
    """Nibble i of word c holds column 8c + AWQ_ORDER[i]; result as signed int32 values."""
    out = []
    for row in codes:
        words = []
        for c in range(len(row) // 8):
            word = 0
            for i in range(8):
                word |= row[8 * c + AWQ_ORDER[i]] << (4 * i)
            words.append(word - (1 << 32) if word >= 1 << 31 else word)
        out.append(words)
    return out


@pytest.mark.parametrize("shape", [(1, 8), (3, 16), (17, 64)])
def test_pack_matches_slow_and_round_trips(shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    codes = torch.randint(0, 16, shape, generator=gen)
    codes[0, :8] = torch.tensor([15, 0, 15, 0, 15, 0, 15, 15])  # the sign nibble set
    packed = pack_int4(codes)
    assert packed.dtype == torch.int32 and packed.shape == (shape[0], shape[1] // 8)
    assert packed.tolist() == slow_pack(codes.tolist())
    assert torch.equal(unpack_int4(packed), codes.int())


def test_known_word() -> None:
    # columns 0..7 hold codes 1..8: nibbles in AWQ order are 1,3,5,7,2,4,6,8
    word = pack_int4(torch.arange(1, 9).view(1, 8)).item() & 0xFFFFFFFF
    assert word == 0x86427531


def test_pack_rejects_ragged_columns() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4(torch.zeros(2, 12, dtype=torch.int32))


def test_dequantize_and_sparse_linear_match_float64_by_hand() -> None:
    gen = torch.Generator().manual_seed(0)
    k_in, n_out, g = 64, 24, 32
    codes = torch.randint(0, 16, (k_in, n_out), generator=gen)
    zeros = torch.randint(0, 16, (k_in // g, n_out), generator=gen)
    scales = torch.rand(k_in // g, n_out, generator=gen, dtype=torch.float64) / 10
    w = dequantize(pack_int4(codes), pack_int4(zeros), scales, g)
    for k in range(0, k_in, 7):
        for n in range(0, n_out, 5):
            assert w[k, n] == (codes[k, n] - zeros[k // g, n]) * scales[k // g, n]
    x = torch.randn(5, k_in, generator=gen, dtype=torch.float64)
    idx = torch.tensor([0, 9, n_out - 1])
    rows = torch.randn(3, k_in, generator=gen, dtype=torch.float64)
    bias = torch.randn(n_out, generator=gen, dtype=torch.float64)
    y = w4_sparse_linear(x, pack_int4(codes), pack_int4(zeros), scales, g, bias, idx, sparse_rows=rows)
    expected = x @ w + bias
    expected[:, idx] += x @ rows.T
    assert torch.allclose(y, expected, rtol=0, atol=1e-12)
    cols_idx = torch.tensor([1, k_in - 1])
    cols = torch.randn(2, n_out, generator=gen, dtype=torch.float64)
    y = w4_sparse_linear(x, pack_int4(codes), pack_int4(zeros), scales, g, None, cols_idx, sparse_cols=cols)
    assert torch.allclose(y, x @ w + x[:, cols_idx] @ cols, rtol=0, atol=1e-12)
