"""The `bench` subcommand of `lape-awq`: one entry per benchmark in this folder."""

from __future__ import annotations

import argparse

from lape_awq.bench import kernels, serve_load


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench", help="benchmarks: kernels (GPU), load (any OpenAI endpoint)", description="Run a benchmark."
    )
    benches = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    kernel_parser = benches.add_parser(
        "kernels",
        help="W4 kernel vs cuBLAS and dequantize+matmul (needs CUDA; skips cleanly without)",
        description=kernels.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kernels.add_arguments(kernel_parser)
    kernel_parser.set_defaults(run=kernels.run)
    load_parser = benches.add_parser(
        "load",
        help="closed-loop streaming load on an OpenAI-compatible endpoint (TTFT, TPOT, ITL, throughput)",
        description=serve_load.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve_load.add_arguments(load_parser)
    load_parser.set_defaults(run=serve_load.run)
