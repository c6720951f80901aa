"""The `bench` subcommand of `lape-awq`: one entry per benchmark in this folder."""

from __future__ import annotations

import argparse

from lape_awq.bench import kernels, serve_load


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench", help="benchmarks: kernels (GPU), load (any OpenAI endpoint)", description="Run a benchmark."
    )
    benches = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for name, module, help_text in (
        ("kernels", kernels, "W4 kernel vs cuBLAS and dequantize+matmul (needs CUDA; skips cleanly without)"),
        ("load", serve_load, "closed-loop streaming load on an OpenAI-compatible endpoint (TTFT, TPOT, ITL)"),
    ):
        bench = benches.add_parser(
            name,
            help=help_text,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(bench)
        bench.set_defaults(run=module.run)
