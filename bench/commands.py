"""The `bench` subcommand of `lape-awq`: one entry per benchmark in this folder.

Every benchmark module has `add_arguments(parser)`, `run(args) -> int` and a docstring that is its
`--help` description; BENCHMARKS names them. `python -m lape_awq.bench.MODULE [options]` is the same as
`lape-awq bench NAME [options]` (run_as_script).
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from lape_awq.bench import (
    gguf_agreement,
    kernels,
    lape_speed,
    pipeline_speed,
    report,
    serve_load,
    serve_matrix,
    soak,
    vllm_speed,
    vocab_quality,
)

# subcommand -> (module, one-line help)
BENCHMARKS = {
    "lape": (lape_speed, "LAPE throughput (tokens/s) on a model, projected to 8 languages x 30k tokens"),
    "pipeline": (pipeline_speed, "the whole AWQ-opt pipeline (LAPE, then quantization), stage by stage"),
    "vocab": (vocab_quality, "the quantized vocabulary alone: bits, clipping, kept-row rules and budgets"),
    "engine": (vllm_speed, "engine decode / prefill speed and weights: FP / AWQ / AWQ-opt / llama.cpp"),
    "kernels": (kernels, "W4 kernel vs cuBLAS and dequantize+matmul (needs CUDA; skips cleanly without)"),
    "load": (serve_load, "streaming load (closed loop or Poisson) on an OpenAI endpoint: TTFT, TPOT"),
    "serve": (serve_matrix, "the serving matrix: FP / AWQ / AWQ-opt and peers (vLLM, llama.cpp) x clients"),
    "soak": (soak, "long streaming load with hot swaps, mistakes and disconnects: failures, latency, RSS"),
    "gguf": (
        gguf_agreement,
        "llama.cpp on the default GGUF vs our FP model: next-token log-probs on held-out text",
    ),
    "report": (report, "FP / AWQ / AWQ-opt table from committed results; regenerates the README's Results"),
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Module docstrings as written, and every option's default (where it has one)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == "":
            return action.help
        return super()._get_help_string(action)


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench", help=f"benchmarks: {', '.join(BENCHMARKS)}", description="Run a benchmark."
    )
    benches = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for name, (module, help_text) in BENCHMARKS.items():
        bench = benches.add_parser(
            name, help=help_text, description=module.__doc__, formatter_class=_HelpFormatter
        )
        module.add_arguments(bench)
        bench.set_defaults(run=module.run)


def run_as_script(module: str) -> NoReturn:
    """`python -m <module> [options]`: `lape-awq bench NAME [options]` for the benchmark in `module` (its
    full name, e.g. `lape_awq.bench.lape_speed`), with the CLI's error lines and exit statuses."""
    from lape_awq.quant.cli.main import main

    name = next(name for name, (bench, _) in BENCHMARKS.items() if bench.__name__ == module)
    raise SystemExit(main(["bench", name, *sys.argv[1:]]))
