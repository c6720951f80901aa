"""The `model` and `neurons` subcommands of `lape-awq`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lape_awq.quant.errors import UserError
from lape_awq.quant.lape import LapeOptions
from lape_awq.quant.text_sources import DEFAULT_LANGUAGES

_SubParsers = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """`--model PATH`, shared by every command that runs a model."""
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="local Hugging Face model directory (default: the embedded Gemma 3 270M, prepared on first use)",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """--tokens/--seq-len/--batch-size/--seed, defaulting to SamplingSettings()."""
    from lape_awq.quant.neuron_finder import SamplingSettings

    d = SamplingSettings()
    parser.add_argument("--tokens", type=int, default=d.tokens_per_language, help="token budget per language")
    parser.add_argument("--seq-len", type=int, default=d.seq_len, help="text tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per forward pass")
    parser.add_argument("--seed", type=int, default=d.seed, help="paragraph sampling seed")


def add_model_command(sub: _SubParsers) -> None:
    parser = sub.add_parser("model", help="prepare or locate the embedded default model")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    prepare = actions.add_parser("prepare", help="convert the packaged Gemma 3 270M GGUF to HF safetensors")
    prepare.add_argument("--force", action="store_true", help="convert again even if already prepared")
    prepare.set_defaults(run=_run_model_prepare)
    where = actions.add_parser("path", help="print where the default model is (or will be) stored")
    where.set_defaults(run=_run_model_path)


def _run_model_prepare(args: argparse.Namespace) -> None:
    from lape_awq.quant.default_model import prepare_default_model

    print(prepare_default_model(force=args.force))


def _run_model_path(_args: argparse.Namespace) -> None:
    from lape_awq.quant.default_model import default_model_dir, is_prepared

    path = default_model_dir()
    print(path)
    if not is_prepared(path):
        print("(not prepared yet: run `lape-awq model prepare`)", file=sys.stderr)


def csv_list(value: str) -> list[str]:
    """argparse type for `a,b,c`."""
    items = [x.strip() for x in value.split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give a comma-separated list")
    return items


def add_langs_argument(parser: argparse.ArgumentParser) -> None:
    """`--langs`, defaulting to the 8 built-in languages."""
    parser.add_argument(
        "--langs",
        type=csv_list,
        default=list(DEFAULT_LANGUAGES),
        help=f"comma-separated language codes (default: {','.join(DEFAULT_LANGUAGES)})",
    )


def add_neurons_command(sub: _SubParsers) -> None:
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
    parser.add_argument(
        "--text", action="append", default=[], metavar="LANG=FILE",
        help="your own UTF-8 text for a language (repeatable); others use the built-in corpus",
    )  # fmt: skip
    parser.add_argument("--target", default="ko", help="language whose neurons to summarise (default: ko)")
    add_sampling_arguments(parser)
    defaults = LapeOptions()
    parser.add_argument("--top-rate", type=float, default=defaults.top_rate, help="fraction of neurons kept")
    parser.add_argument("--filter-rate", type=float, default=defaults.filter_rate, help="candidate quantile")
    parser.add_argument(
        "--activation-bar-ratio", type=float, default=defaults.activation_bar_ratio,
        help="quantile a language's p must exceed to own a kept neuron",
    )  # fmt: skip
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where fast), float32, bfloat16, float16")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="also write a heat-map + histogram PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=_run_neurons)


def _run_neurons(args: argparse.Namespace) -> None:
    from lape_awq.quant.model_loading import pick_dtype, resolve_model_dir
    from lape_awq.quant.neuron_finder import SamplingSettings, require_languages
    from lape_awq.quant.neurons_job import default_neurons_path, find_and_save_neurons
    from lape_awq.quant.neurons_report import summary_lines, write_plot
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
