"""Arguments shared by several `lape-awq` commands (and the benchmarks that mirror them)."""

from __future__ import annotations

import argparse

from lape_awq.quant.text_sources import DEFAULT_LANGUAGES


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """`--model PATH`, shared by every command that runs a model."""
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="local Hugging Face model directory (default: the embedded Gemma 3 270M, prepared on first use)",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """--tokens/--seq-len/--batch-size/--seed, defaulting to SamplingSettings()."""
    from lape_awq.quant.lape.finder import SamplingSettings

    d = SamplingSettings()
    parser.add_argument("--tokens", type=int, default=d.tokens_per_language, help="token budget per language")
    parser.add_argument("--seq-len", type=int, default=d.seq_len, help="text tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per forward pass")
    parser.add_argument("--seed", type=int, default=d.seed, help="paragraph sampling seed")


def csv_list(value: str) -> list[str]:
    """argparse type for `a,b,c`."""
    items = [x.strip() for x in value.split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give a comma-separated list")
    return items


def language_weights(value: str) -> tuple[tuple[str, float], ...]:
    """argparse type for `ko=2,en=0.5`: (language, weight) pairs."""
    out = []
    for item in csv_list(value):
        lang, _, weight = item.partition("=")
        try:
            out.append((lang.strip(), float(weight)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"give LANG=WEIGHT pairs, got {item!r}") from None
    return tuple(out)


def add_langs_argument(parser: argparse.ArgumentParser) -> None:
    """`--langs`, defaulting to the 8 built-in languages."""
    parser.add_argument(
        "--langs",
        type=csv_list,
        default=list(DEFAULT_LANGUAGES),
        help=f"comma-separated language codes (default: {','.join(DEFAULT_LANGUAGES)})",
    )


def add_text_argument(parser: argparse.ArgumentParser, what: str, otherwise: str) -> None:
    """`--text LANG=FILE`, repeatable: the user's text for some languages (read by text_sources)."""
    parser.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="LANG=FILE",
        help=f"{what} for a language (repeatable); others use {otherwise}",
    )
