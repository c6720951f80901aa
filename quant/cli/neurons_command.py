"""The `neurons` subcommand: LAPE language-specific FFN neurons -> a neurons file."""

from __future__ import annotations

import argparse
from pathlib import Path

from lape_awq.quant.cli.arguments import (
    add_langs_argument,
    add_model_argument,
    add_sampling_arguments,
    add_text_argument,
)
from lape_awq.quant.errors import UserError
from lape_awq.quant.lape.selection import LapeOptions


def add_neurons_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "neurons",
        help="find language-specific FFN neurons with LAPE",
        description="Run the model over text in several languages and select the FFN neurons specific to "
        "each (LAPE, Tang et al. 2024). Writes a neurons file and prints a summary for --target.",
    )
    add_model_argument(parser)
    parser.add_argument(
        "--out", type=Path, help="neurons file to write (default: in $LAPE_AWQ_HOME/neurons/)"
    )
    add_langs_argument(parser)
    add_text_argument(parser, "your own UTF-8 text", "the built-in corpus")
    parser.add_argument("--target", default="ko", help="language whose neurons to summarise (default: ko)")
    add_sampling_arguments(parser)
    defaults = LapeOptions()
    parser.add_argument("--top-rate", type=float, default=defaults.top_rate, help="fraction of neurons kept")
    parser.add_argument("--filter-rate", type=float, default=defaults.filter_rate, help="candidate quantile")
    parser.add_argument(
        "--activation-bar-ratio",
        type=float,
        default=defaults.activation_bar_ratio,
        help="quantile a language's p must exceed to own a kept neuron",
    )
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where fast), float32, bfloat16, float16")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="also write a heat-map + histogram PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=_run_neurons)


def _run_neurons(args: argparse.Namespace) -> None:
    from lape_awq.quant.lape.finder import SamplingSettings, require_languages
    from lape_awq.quant.lape.job import default_neurons_path, find_and_save_neurons
    from lape_awq.quant.lape.report import summary_lines, write_plot
    from lape_awq.quant.model_loading import pick_dtype, resolve_model_dir
    from lape_awq.quant.text_sources import language_texts, parse_text_args

    require_languages(args.langs)
    if args.target not in args.langs:
        raise UserError(f"--target {args.target!r} is not among --langs {','.join(args.langs)}")
    options = LapeOptions(args.top_rate, args.filter_rate, args.activation_bar_ratio)
    sampling = SamplingSettings(args.tokens, args.seq_len, args.batch_size, args.seed)
    texts = language_texts(args.langs, parse_text_args(args.text))
    pick_dtype(args.dtype)  # refuse a bad --dtype before the model is prepared
    model_dir = resolve_model_dir(args.model)
    out = args.out or default_neurons_path(model_dir)
    nf, seconds = find_and_save_neurons(
        model_dir, out, texts, options, sampling, args.dtype, progress=not args.quiet
    )
    total_tokens = int(nf.tokens.sum())
    for line in summary_lines(nf, args.target):
        print(line)
    print(f"LAPE over {total_tokens:,} tokens in {seconds:.1f}s ({total_tokens / seconds:,.0f} tokens/s)")
    print(f"neurons file: {out}")
    if args.plot:
        write_plot(nf, args.plot, args.target)
        print(f"plot: {args.plot}")
