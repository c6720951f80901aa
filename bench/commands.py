"""The `bench` subcommand of `lape-awq`: one entry per benchmark in this folder."""

from __future__ import annotations

import argparse

from lape_awq.bench import kernels, report, serve_load, serve_matrix


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Module docstrings as written, and every option's default (where it has one)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == "":
            return action.help
        return super()._get_help_string(action)


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench",
        help="benchmarks: kernels (GPU), load, serve (matrix), report",
        description="Run a benchmark.",
    )
    benches = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for name, module, help_text in (
        ("kernels", kernels, "W4 kernel vs cuBLAS and dequantize+matmul (needs CUDA; skips cleanly without)"),
        ("load", serve_load, "streaming load (closed loop or Poisson) on an OpenAI endpoint: TTFT, TPOT"),
        (
            "serve",
            serve_matrix,
            "the serving matrix: FP / stock AWQ / AWQ / AWQ-opt x concurrency, with memory",
        ),
        (
            "report",
            report,
            "FP / AWQ / AWQ-opt table from committed results; regenerates the README's Results",
        ),
    ):
        bench = benches.add_parser(
            name,
            help=help_text,
            description=module.__doc__,
            formatter_class=_HelpFormatter,
        )
        module.add_arguments(bench)
        bench.set_defaults(run=module.run)
