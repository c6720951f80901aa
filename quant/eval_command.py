"""The `eval` subcommand: per-language perplexity, KL and top-1 agreement of checkpoints vs their model."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lape_awq.quant.commands import add_langs_argument, add_model_argument
from lape_awq.quant.errors import UserError
from lape_awq.quant.evaluation import DEFAULT_MAX_TOKENS, DEFAULT_SEQ_LEN, FP_NAME, check_settings

DEFAULT_OUT = Path("eval-results")


def add_eval_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval",
        help="per-language perplexity, KL and top-1 agreement of checkpoints against their float model",
        description="Run the float model and each checkpoint on the same held-out windows of every "
        "language; writes eval.md, eval.json and eval.png to --out and prints the tables.",
    )
    add_model_argument(parser)
    parser.add_argument(
        "--checkpoint", action="append", default=[], metavar="[NAME=]PATH",
        help="a checkpoint directory (repeatable); shown as its directory name unless NAME= is given",
    )  # fmt: skip
    add_langs_argument(parser)
    parser.add_argument(
        "--text", action="append", default=[], metavar="LANG=FILE",
        help="your own held-out UTF-8 text for a language (repeatable); others use the built-in held-out one",
    )  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="tokens per language")
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="text tokens per window")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default: ./{DEFAULT_OUT})"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=_run_eval)


def parse_checkpoint_args(items: list[str]) -> dict[str, Path]:
    """`["a/awq", "opt=b/x"]` -> {"awq": Path("a/awq"), "opt": Path("b/x")}; names unique, dirs existing."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, rest = item.partition("=")
        # An existing path that happens to hold "=" is a path, not NAME=PATH.
        if sep and name.strip() and rest and "/" not in name and not Path(item).expanduser().exists():
            name, path = name.strip(), Path(rest).expanduser()
        else:
            path = Path(item).expanduser()
            name = path.resolve().name
        if not path.is_dir():
            raise UserError(f"checkpoint directory not found: {path}")
        if name == FP_NAME:
            raise UserError(
                f"{FP_NAME!r} names the float model; give the checkpoint {path} another NAME=PATH"
            )
        if name in out:
            raise UserError(f"two checkpoints are named {name!r}: tell them apart with NAME=PATH")
        out[name] = path
    if not out:
        raise UserError("give at least one --checkpoint PATH to compare with the float model")
    return out


def _run_eval(args: argparse.Namespace) -> None:
    import torch

    from lape_awq.quant.eval_report import markdown, write_reports
    from lape_awq.quant.evaluation import evaluate, load_checkpoints
    from lape_awq.quant.model_loading import load_causal_lm, resolve_model_dir
    from lape_awq.quant.text_sources import language_texts, parse_text_args

    # Every cheap check first, so a mistake is reported before any model is prepared or loaded.
    check_settings(args.max_tokens, args.seq_len)
    texts = language_texts(args.langs, parse_text_args(args.text), split="heldout")
    checkpoints = parse_checkpoint_args(args.checkpoint)
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out must be a folder, got a file: {args.out}")
    model_dir = resolve_model_dir(args.model)
    with _transformers_bars(not args.quiet):
        fp_model, tokenizer = load_causal_lm(model_dir, torch.float32)
        quantized = load_checkpoints(checkpoints, fp_model)
    paths = {FP_NAME: str(model_dir.resolve()), **{n: str(p.resolve()) for n, p in checkpoints.items()}}
    started = time.perf_counter()
    result = evaluate(
        fp_model, tokenizer, quantized, texts, max_tokens=args.max_tokens, seq_len=args.seq_len,
        progress=not args.quiet, model_paths=paths,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    written = write_reports(result, args.out)
    print(markdown(result))
    print(f"evaluated {len(result.models)} models x {len(result.langs)} languages in {seconds:.1f}s")
    print("results: " + ", ".join(str(p) for p in written.values()))


@contextmanager
def _transformers_bars(show: bool) -> Iterator[None]:
    """--quiet also silences transformers' own weight-loading bars, for this command only."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if not show:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
