"""W4 kernel benchmark (GPU): our Triton kernel with k = 0 and with 1% kept neurons, against FP16 cuBLAS and
against dequantize-then-matmul, on Llama-3.2-3B and Gemma-2-9B linear shapes, M = 1 ... 2048.

CUDA-event timing, median of many runs after warm-up, inputs rotated across enough weight copies that L2
cannot serve them; the card's copy bandwidth is measured in the same run. Without CUDA it prints why and
exits 0 (`--smoke` runs the whole path on tiny shapes in Triton's CPU interpreter, for tests; its times
mean nothing).

    lape-awq bench kernels [--models llama-3.2-3b,gemma-2-9b] [--m 1,16,512] [--dtype float16] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lape_awq.bench.run_info import result_header, write_json
from lape_awq.quant.errors import UserError
from lape_awq.quant.file_io import write_atomic

M_VALUES = (1, 2, 4, 8, 16, 32, 64, 128, 512, 2048)
GROUP_SIZE = 128
KEPT_FRACTION = 0.01
# More weight bytes than this per rotation keeps every timed call streaming from HBM (H100/H200 L2: 50 MB).
ROTATION_BYTES = 256 * 2**20


@dataclass(frozen=True)
class LinearShape:
    model: str
    name: str
    n: int  # output features
    k: int  # input features
    sparse: str | None  # "gate_up" (kept rows in gate and up), "cols" (down), or None (attention)
    intermediate: int = 0


def model_shapes(
    name: str, hidden: int, intermediate: int, q_out: int, kv_out: int, o_in: int
) -> list[LinearShape]:
    return [
        LinearShape(name, "qkv_proj", q_out + 2 * kv_out, hidden, None),
        LinearShape(name, "o_proj", hidden, o_in, None),
        LinearShape(name, "gate_up_proj", 2 * intermediate, hidden, "gate_up", intermediate),
        LinearShape(name, "down_proj", hidden, intermediate, "cols", intermediate),
    ]


MODELS = {
    "llama-3.2-3b": model_shapes("llama-3.2-3b", 3072, 8192, 24 * 128, 8 * 128, 24 * 128),
    "gemma-2-9b": model_shapes("gemma-2-9b", 3584, 14336, 16 * 256, 8 * 256, 16 * 256),
}
SMOKE_SHAPES = [
    LinearShape("smoke", "gate_up_proj", 256, 128, "gate_up", 128),
    LinearShape("smoke", "down_proj", 128, 256, "cols", 256),
]


@dataclass
class W4Weights:
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    sparse: object | None  # SparseCorrection

    def nbytes(self) -> int:
        tensors = [self.qweight, self.qzeros, self.scales]
        if self.sparse is not None:
            tensors += [self.sparse.slots, self.sparse.values]
        return sum(t.numel() * t.element_size() for t in tensors)


def random_w4(shape: LinearShape, kept: int, device: torch.device, gen: torch.Generator) -> W4Weights:
    """Random codes and scales in the checkpoint layout; `kept` neurons per MLP with random FP16 residuals."""
    from lape_awq.kernels.sparse_correction import merged_rows, sparse_cols

    k, n, g = shape.k, shape.n, GROUP_SIZE
    qweight = torch.randint(-(2**31), 2**31 - 1, (k, n // 8), dtype=torch.int32, generator=gen)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (k // g, n // 8), dtype=torch.int32, generator=gen)
    scales = (torch.rand(k // g, n, generator=gen) / 100).half()
    sparse = None
    if kept and shape.sparse == "gate_up":
        parts = []
        for _ in range(2):
            idx = torch.randperm(shape.intermediate, generator=gen)[:kept].sort().values
            parts.append((idx, (torch.randn(kept, k, generator=gen) / 100).half(), shape.intermediate))
        sparse = merged_rows(parts)
    elif kept and shape.sparse == "cols":
        idx = torch.randperm(shape.intermediate, generator=gen)[:kept].sort().values
        sparse = sparse_cols(idx, (torch.randn(kept, n, generator=gen) / 100).half(), k)
    if sparse is not None:
        sparse = type(sparse)(sparse.kind, sparse.slots.to(device), sparse.values.to(device))
    return W4Weights(qweight.to(device), qzeros.to(device), scales.to(device), sparse)


def time_cuda(fn: Callable[[int], object], rotation: int, warmup: int, reps: int) -> float:
    """Median seconds of fn(i) (i cycles through the rotated inputs), timed with CUDA events."""
    for i in range(warmup):
        fn(i % rotation)
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i % rotation)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def time_wall(fn: Callable[[int], object], rotation: int, warmup: int, reps: int) -> float:
    """The interpreter's stand-in for time_cuda (smoke runs only)."""
    fn(0)
    start = time.perf_counter()
    for i in range(reps):
        fn(i % rotation)
    return (time.perf_counter() - start) / reps


def copy_bandwidth(device: torch.device, timer: Callable[..., float], nbytes: int) -> float:
    """Bytes/s of a device-to-device copy (read + write), the ceiling a memory-bound kernel can reach."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timer(lambda _i: dst.copy_(src), 1, 5, 20)


def run_w4(x: torch.Tensor, w: W4Weights) -> torch.Tensor:
    from lape_awq.kernels.w4_gemm import w4_linear

    return w4_linear(x, w.qweight, w.qzeros, w.scales, GROUP_SIZE, None, w.sparse)


def dequantize_weights(w: W4Weights, dtype: torch.dtype) -> torch.Tensor:
    from lape_awq.kernels.awq_packing import dequantize

    return dequantize(w.qweight, w.qzeros, w.scales.to(dtype), GROUP_SIZE)


def bench_shape(
    shape: LinearShape, m_values: list[int], dtype: torch.dtype, device: torch.device, timer, reps: int
) -> list[dict[str, object]]:
    gen = torch.Generator().manual_seed(0)
    kept = max(1, round(KEPT_FRACTION * shape.intermediate)) if shape.sparse else 0
    dense = random_w4(shape, 0, device, gen)
    rotation = max(1, min(8, ROTATION_BYTES // dense.nbytes())) if device.type == "cuda" else 1
    plain = [dense] + [random_w4(shape, 0, device, gen) for _ in range(rotation - 1)]
    opt = [random_w4(shape, kept, device, gen) for _ in range(rotation)] if kept else []
    fp16_rotation = max(1, min(4, ROTATION_BYTES // (shape.n * shape.k * 2))) if device.type == "cuda" else 1
    fp16 = [torch.randn(shape.n, shape.k, generator=gen).to(dtype).to(device) for _ in range(fp16_rotation)]
    rows = []
    for m in m_values:
        x = [torch.randn(m, shape.k, generator=gen).to(dtype).to(device) for _ in range(rotation)]

        calls: dict[str, tuple[Callable[[int], object], int]] = {
            "cublas": (lambda i, x=x: torch.nn.functional.linear(x[0], fp16[i]), fp16_rotation),
            "dequant_matmul": (lambda i, x=x: x[i] @ dequantize_weights(plain[i], dtype), rotation),
            "ours_k0": (lambda i, x=x: run_w4(x[i], plain[i]), rotation),
        }
        if kept:
            calls["ours_k1pct"] = (lambda i, x=x: run_w4(x[i], opt[i]), rotation)
        times = {variant: timer(fn, rot, 10, reps) for variant, (fn, rot) in calls.items()}
        io_bytes = (m * shape.k + m * shape.n) * x[0].element_size()
        w4_bytes = {"ours_k0": plain[0].nbytes(), "ours_k1pct": opt[0].nbytes() if kept else 0}
        for variant, seconds in times.items():
            weight_bytes = w4_bytes.get(
                variant, shape.n * shape.k * 2 if variant == "cublas" else plain[0].nbytes()
            )
            rows.append(
                {
                    **asdict(shape),
                    "m": m,
                    "kept_per_mlp": kept if variant == "ours_k1pct" else 0,
                    "variant": variant,
                    "seconds": seconds,
                    "tflops": 2 * m * shape.n * shape.k / seconds / 1e12,
                    "gbps": (weight_bytes + io_bytes) / seconds / 1e9,
                }
            )
    return rows


def summarize(rows: list[dict[str, object]], bandwidth: float) -> list[str]:
    """A markdown table: one line per (shape, M) with the variants' times and the ratios the targets name."""
    lines = [
        f"Copy bandwidth measured in this run: {bandwidth / 1e9:.0f} GB/s",
        "",
        "| shape | M | cuBLAS dense µs | dequant+mm µs | ours k=0 µs | ours k=1% µs | × cuBLAS (k=0) "
        "| sparse overhead | % of copy BW (k=0) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    keyed: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        keyed.setdefault((r["model"], r["name"], r["m"]), {})[r["variant"]] = r
    for (model, name, m), v in keyed.items():
        ours, cublas = v["ours_k0"], v["cublas"]
        sparse = v.get("ours_k1pct")
        overhead = f"{sparse['seconds'] / ours['seconds'] - 1:+.1%}" if sparse else "—"
        lines.append(
            f"| {model} {name} | {m} | {cublas['seconds'] * 1e6:.1f} "
            f"| {v['dequant_matmul']['seconds'] * 1e6:.1f} "
            f"| {ours['seconds'] * 1e6:.1f} | {sparse['seconds'] * 1e6 if sparse else float('nan'):.1f} "
            f"| {cublas['seconds'] / ours['seconds']:.2f} | {overhead} "
            f"| {ours['gbps'] * 1e9 / bandwidth:.0%} |"
        )
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--m", default=",".join(map(str, M_VALUES)), help="comma list of token counts M")
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    parser.add_argument("--reps", type=int, default=100, help="timed runs per measurement (median reported)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="result folder")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes in Triton's CPU interpreter (tests)"
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; prints the table and writes JSON + markdown under --out."""
    if args.smoke:
        shapes, m_values, reps = SMOKE_SHAPES, [1, 37], 1
    else:
        names = args.models.split(",")
        unknown = sorted(set(names) - set(MODELS))
        if unknown:
            raise UserError(
                f"unknown model(s) {unknown} for the kernel benchmark; known: {', '.join(MODELS)}"
            )
        try:
            m_values = [int(m) for m in args.m.split(",")]
        except ValueError:
            raise UserError(f"--m must be a comma list of integers, got {args.m!r}") from None
        shapes, reps = [s for name in names for s in MODELS[name]], args.reps
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("lape-awq bench kernels: CUDA is not available; the kernel benchmark needs a GPU. Skipped.")
        return 0
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels module is first imported
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    timer = time_cuda if cuda else time_wall
    bandwidth = copy_bandwidth(device, timer, 2**30 if cuda else 2**20)
    rows = []
    for i, shape in enumerate(shapes, 1):
        print(f"[{i}/{len(shapes)}] {shape.model} {shape.name} N={shape.n} K={shape.k}", flush=True)
        rows += bench_shape(shape, m_values, dtype, device, timer, reps)
    table = summarize(rows, bandwidth)
    record = {
        **result_header("kernels"),
        "smoke": args.smoke,
        "dtype": args.dtype,
        "group_size": GROUP_SIZE,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "rows": rows,
    }
    card = (torch.cuda.get_device_name() if cuda else "interpreter").replace(" ", "_")
    stem = f"kernels_{card}_{record['date'][:10]}" + ("_smoke" if args.smoke else "")
    write_json(args.out / f"{stem}.json", record)
    write_atomic(
        args.out / f"{stem}.md",
        f"# W4 kernels, {card}, {record['date']}, commit {record['commit']}\n\n" + "\n".join(table) + "\n",
    )
    print("\n".join(table))
    print(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    from lape_awq.bench.commands import run_as_script

    run_as_script(__spec__.name)
