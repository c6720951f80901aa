"""The Triton W4 + sparse kernels against the layer's formula in plain torch, in float64 (Triton's CPU
interpreter, or CUDA).

Tolerance, normwise: max|y - ref| <= tol * max|ref| with tol 1e-4 for fp32 and 1e-2 for fp16/bf16; every
output is poisoned with NaN before the launch, so an element the kernel never writes fails.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch

from lape_awq.kernels.awq_packing import pack_int4, w4_sparse_linear
from lape_awq.kernels.sparse_correction import SparseCorrection, merged_rows, sparse_cols, sparse_rows
from lape_awq.kernels.w4_configs import DECODE_MAX_M, KernelConfig, pick_config
from lape_awq.kernels.w4_gemm import w4_linear

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
M_VALUES = (1, 3, 16, 37, 128)


@dataclass(frozen=True)
class Case:
    n: int
    k: int
    group: int
    kind: str | None  # "rows", "cols", "gate_up" or None (plain AWQ)
    kept: int | tuple[int, int]  # neurons kept; (gate, up) for gate_up
    bias: bool


CASES = {
    "rows-k7-g64-bias": Case(192, 256, 64, "rows", 7, True),
    "cols-k64-g128": Case(64, 512, 128, "cols", 64, False),
    "plain-awq-g32-ragged-n-bias": Case(136, 96, 32, None, 0, True),
    "gate_up-k1+7-g32": Case(256, 128, 32, "gate_up", (1, 7), False),
    "cols-k1-g128-bias": Case(72, 384, 128, "cols", 1, True),
    "rows-k64-g64": Case(128, 64, 64, "rows", 64, False),
}


@dataclass
class Problem:
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None
    sparse: SparseCorrection | None
    reference: torch.Tensor  # float64 [m, n]
    reference_dense_only: torch.Tensor  # the same without the sparse term


def kept_indices(count: int, size: int, gen: torch.Generator, first: bool) -> torch.Tensor:
    """`count` sorted unique indices; the first and last channel always among them when count >= 2."""
    if count == 1:
        return torch.tensor([0 if first else size - 1])
    inner = torch.randperm(size - 2, generator=gen)[: max(count - 2, 0)] + 1
    ends = torch.tensor([0, size - 1]) if count >= 2 else torch.tensor([], dtype=torch.long)
    return torch.cat([ends, inner]).sort().values


def make_problem(case: Case, x: torch.Tensor, gen: torch.Generator) -> Problem:
    k_in, n_out, g = case.k, case.n, case.group
    codes = torch.randint(0, 16, (k_in, n_out), generator=gen)
    zeros = torch.randint(0, 16, (k_in // g, n_out), generator=gen)
    scales = (torch.rand(k_in // g, n_out, generator=gen) / 40 + 0.005).half()
    qweight, qzeros = pack_int4(codes), pack_int4(zeros)
    bias = torch.randn(n_out, generator=gen).half() if case.bias else None
    x64 = x.double().cpu()
    bias64 = None if bias is None else bias.double()

    def ref(cols: slice, idx=None, rows=None, kept_cols=None) -> torch.Tensor:
        packs = slice(cols.start // 8, cols.stop // 8)
        return w4_sparse_linear(
            x64,
            qweight[:, packs],
            qzeros[:, packs],
            scales[:, cols].double(),
            g,
            None if bias64 is None else bias64[cols],
            idx,
            rows,
            kept_cols,
        )

    everything = slice(0, n_out)
    dense_only = ref(everything)
    # Residuals larger than the weights themselves, so a lost sparse term is far outside the tolerance.
    if case.kind == "rows":
        idx = kept_indices(case.kept, n_out, gen, first=True)
        rows = (torch.randn(idx.numel(), k_in, generator=gen) / 2).half()
        sparse, reference = sparse_rows(idx, rows, n_out), ref(everything, idx, rows.double())
    elif case.kind == "cols":
        idx = kept_indices(case.kept, k_in, gen, first=False)
        cols = (torch.randn(idx.numel(), n_out, generator=gen) / 2).half()
        sparse, reference = sparse_cols(idx, cols, k_in), ref(everything, idx, None, cols.double())
    elif case.kind == "gate_up":
        half = n_out // 2
        parts, refs = [], []
        for count, part, first in zip(
            case.kept, (slice(0, half), slice(half, n_out)), (True, False), strict=True
        ):
            idx = kept_indices(count, half, gen, first)
            rows = (torch.randn(idx.numel(), k_in, generator=gen) / 2).half()
            parts.append((idx, rows, half))
            refs.append(ref(part, idx, rows.double()))
        sparse, reference = merged_rows(parts), torch.cat(refs, dim=1)
    else:
        sparse, reference = None, dense_only
    return Problem(
        qweight.to(DEVICE),
        qzeros.to(DEVICE),
        scales.to(DEVICE),
        None if bias is None else bias.to(DEVICE),
        None if sparse is None else on_device(sparse),
        reference,
        dense_only,
    )


def on_device(s: SparseCorrection) -> SparseCorrection:
    return SparseCorrection(s.kind, s.slots.to(DEVICE), s.values.to(DEVICE))


def run_kernel(x: torch.Tensor, p: Problem, group: int, config: KernelConfig | None = None) -> torch.Tensor:
    n_out = p.scales.shape[1]
    out = torch.full((x.shape[0], n_out), float("nan"), dtype=x.dtype, device=DEVICE)
    workspace = torch.full((16, x.shape[0], n_out), float("nan"), dtype=torch.float32, device=DEVICE)
    y = w4_linear(
        x, p.qweight, p.qzeros, p.scales, group, p.bias, p.sparse, out=out, workspace=workspace, config=config
    )
    assert y.data_ptr() == out.data_ptr()
    return y.double().cpu()


def assert_close(y: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(y).all(), f"{(~torch.isfinite(y)).sum()} outputs unwritten or not finite"
    err = (y - reference).abs().max().item() / reference.abs().max().item()
    assert err <= TOLERANCE[dtype], f"normwise error {err:.2e} > {TOLERANCE[dtype]:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("case_name", list(CASES))
def test_kernel_matches_float64_reference(case_name: str, m: int, dtype: torch.dtype) -> None:
    case = CASES[case_name]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case_name}/{m}/{dtype}".encode()))
    x = torch.randn(m, case.k, generator=gen).to(dtype).to(DEVICE)
    p = make_problem(case, x, gen)
    if case.kind is not None:  # the test can see a missing or misplaced sparse term
        gap = (p.reference - p.reference_dense_only).abs().max() / p.reference.abs().max()
        assert gap > 3 * TOLERANCE[dtype]
    assert_close(run_kernel(x, p, case.group), p.reference, dtype)


@pytest.mark.parametrize(
    "config",
    [
        KernelConfig(16, 32, 32, 1),
        KernelConfig(16, 64, 32, 3),
        KernelConfig(32, 64, 128, 16),
        KernelConfig(64, 128, 64, 1),
    ],
    ids=lambda c: f"bm{c.block_m}-bn{c.block_n}-bk{c.block_k}-split{c.split_k}",
)
def test_every_tile_shape_and_split_gives_the_same_result(config: KernelConfig) -> None:
    case = Case(200, 512, 128, "cols", 7, True)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, case.k, generator=gen).to(DEVICE)
    p = make_problem(case, x, gen)
    assert_close(run_kernel(x, p, case.group, config), p.reference, torch.float32)


def test_dispatcher_splits_k_for_decode_and_tiles_prefill() -> None:
    for m in (1, 16, DECODE_MAX_M):
        cfg = pick_config(m, 256, 4096, 128, DEVICE)
        assert cfg.block_m in (16, 32)
        assert cfg.split_k > 1
    for m in (DECODE_MAX_M + 1, 512, 2048):
        cfg = pick_config(m, 2048, 4096, 128, DEVICE)
        assert cfg.split_k == 1 and cfg.block_m >= 64
    for g in (32, 64, 128):
        assert pick_config(1, 256, 1024, g, DEVICE).block_k <= g
        assert pick_config(512, 256, 1024, g, DEVICE).block_k <= g


def test_leading_dims_and_empty_batch() -> None:
    case = CASES["rows-k7-g64-bias"]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, case.k, generator=gen).to(DEVICE)
    p = make_problem(case, x.reshape(6, case.k), gen)
    y = w4_linear(x, p.qweight, p.qzeros, p.scales, case.group, p.bias, p.sparse)
    assert y.shape == (2, 3, case.n)
    assert_close(y.reshape(6, case.n).double().cpu(), p.reference, torch.float32)
    empty = w4_linear(x[:0], p.qweight, p.qzeros, p.scales, case.group, p.bias, p.sparse)
    assert empty.shape == (0, 3, case.n)


def _valid(n: int = 64, k: int = 128, g: int = 64) -> dict:
    return dict(
        x=torch.randn(2, k, device=DEVICE),
        qweight=torch.zeros(k, n // 8, dtype=torch.int32, device=DEVICE),
        qzeros=torch.zeros(k // g, n // 8, dtype=torch.int32, device=DEVICE),
        scales=torch.ones(k // g, n, dtype=torch.float16, device=DEVICE),
        group_size=g,
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.update(x=a["x"].double()), "fp16, bf16 or fp32"),
        (lambda a: a.update(x=a["x"].int()), "fp16, bf16 or fp32"),
        (lambda a: a.update(x=torch.randn(128, 2, device=DEVICE).T), "contiguous"),
        (lambda a: a.update(qweight=a["qweight"].long()), "qweight must be"),
        (lambda a: a.update(scales=a["scales"].int()), "scales must be"),
        (lambda a: a.update(scales=a["scales"][:, :8]), "scales must be"),
        (lambda a: a.update(qzeros=a["qzeros"][:1]), "qzeros must be"),
        (lambda a: a.update(x=torch.randn(2, 96, device=DEVICE)), "input features"),
        (lambda a: a.update(group_size=48), "group size 48 not supported"),
        (
            lambda a: a.update(
                x=torch.randn(2, 96, device=DEVICE),
                qweight=torch.zeros(96, 8, dtype=torch.int32, device=DEVICE),
                qzeros=torch.zeros(1, 8, dtype=torch.int32, device=DEVICE),
                scales=torch.ones(1, 64, dtype=torch.float16, device=DEVICE),
            ),
            "not divisible by the group size",
        ),
        (lambda a: a.update(bias=torch.zeros(63, device=DEVICE)), "bias must be"),
        (
            lambda a: a.update(sparse=sparse_rows(torch.tensor([1]), torch.zeros(1, 128), 128)),
            "slots must be",
        ),
        (
            lambda a: a.update(sparse=sparse_cols(torch.tensor([1]), torch.zeros(1, 32), 128)),
            r"values must be \[k, 64\]",
        ),
    ],
)
def test_bad_input_is_refused_before_launch(change, message: str) -> None:
    args = _valid()
    change(args)
    if args.get("sparse") is not None:
        args["sparse"] = on_device(args["sparse"])
    with pytest.raises(ValueError, match=message):
        w4_linear(**args)


@pytest.mark.parametrize(
    ("idx", "message"),
    [
        (torch.tensor([3, 64]), "out of range"),
        (torch.tensor([-1, 3]), "out of range"),
        (torch.tensor([5, 3]), "sorted"),
        (torch.tensor([3, 3]), "duplicates"),
        (torch.tensor([[1, 2]]), "1-D integer"),
        (torch.tensor([1.0, 2.0]), "1-D integer"),
    ],
)
def test_bad_sparse_indices_are_refused(idx: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sparse_rows(idx, torch.zeros(idx.numel(), 16), 64)
    with pytest.raises(ValueError, match=message):
        sparse_cols(idx, torch.zeros(idx.numel(), 16), 64)


def test_sparse_values_must_match_the_indices() -> None:
    with pytest.raises(ValueError, match=r"values must be \[2, width\]"):
        sparse_rows(torch.tensor([1, 2]), torch.zeros(3, 16), 64)
