"""The `eval` subcommand: per-language perplexity, KL and top-1 agreement of checkpoints vs their model,
and optionally a pairwise judge of their Korean answers."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lape_awq.quant.cli.arguments import add_langs_argument, add_model_argument, add_text_argument, csv_list
from lape_awq.quant.errors import UserError
from lape_awq.quant.evaluation.judge.answers import DEFAULT_MAX_NEW_TOKENS
from lape_awq.quant.evaluation.judge.client import KEY_ENV
from lape_awq.quant.evaluation.judge.pairwise import DEFAULT_PARALLEL
from lape_awq.quant.evaluation.scoring import DEFAULT_MAX_TOKENS, DEFAULT_SEQ_LEN, FP_NAME, check_settings

if TYPE_CHECKING:
    from torch import nn

    from lape_awq.quant.evaluation.judge.client import JudgeClient
    from lape_awq.quant.evaluation.judge.questions import Question

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
        "--checkpoint",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="a checkpoint directory (repeatable); shown as its directory name unless NAME= is given",
    )
    add_langs_argument(parser)
    add_text_argument(parser, "your own held-out UTF-8 text", "the built-in held-out one")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="tokens per language")
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="text tokens per window")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default: ./{DEFAULT_OUT})"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_judge_arguments(parser)
    parser.set_defaults(run=_run_eval)


def add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    """The pairwise judge's options; all but --judge-url default to None so a stray one can be refused."""
    judge = parser.add_argument_group(
        "pairwise judge",
        "MT-Bench-style win/tie/loss of every pair of models on Korean questions, judged by any "
        "OpenAI-compatible endpoint; off unless --judge-url is given. Writes judge.md and judge.json "
        "to --out.",
    )
    judge.add_argument("--judge-url", metavar="URL", help="the judge's API root, e.g. http://host:8000/v1")
    judge.add_argument("--judge-key", metavar="KEY", help=f"its API key (default: ${KEY_ENV}, else EMPTY)")
    judge.add_argument("--judge-model", metavar="NAME", help="judge model (default: the first it lists)")
    judge.add_argument(
        "--judge-questions",
        type=int,
        metavar="N",
        help="at most N questions, balanced over the categories (default: all)",
    )
    judge.add_argument(
        "--judge-categories",
        type=csv_list,
        metavar="CAT,...",
        help="only these categories (writing, roleplay, reasoning, math, coding, extraction, stem, "
        "humanities)",
    )
    judge.add_argument(
        "--judge-question-file",
        type=Path,
        metavar="JSONL",
        help="your own questions instead of the packaged ones (id, category, question[, reference] per line)",
    )
    judge.add_argument(
        "--judge-max-tokens",
        type=int,
        metavar="N",
        help=f"new tokens per answer (default: {DEFAULT_MAX_NEW_TOKENS})",
    )
    judge.add_argument(
        "--judge-parallel",
        type=int,
        metavar="N",
        help=f"judge requests in flight at once (default: {DEFAULT_PARALLEL})",
    )


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

    from lape_awq.quant.evaluation.checkpoints import load_checkpoints
    from lape_awq.quant.evaluation.report import markdown, write_reports
    from lape_awq.quant.evaluation.scoring import evaluate
    from lape_awq.quant.model_loading import load_causal_lm, resolve_model_dir
    from lape_awq.quant.text_sources import language_texts, parse_text_args

    # Every cheap check first, so a mistake is reported before any model is prepared or loaded.
    check_settings(args.max_tokens, args.seq_len)
    texts = language_texts(args.langs, parse_text_args(args.text), split="heldout")
    checkpoints = parse_checkpoint_args(args.checkpoint)
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out must be a folder, got a file: {args.out}")
    # The judge's questions and endpoint are checked before minutes of model loading and answering.
    judge = _prepare_judge(args)
    model_dir = resolve_model_dir(args.model)
    with _transformers_bars(not args.quiet):
        fp_model, tokenizer = load_causal_lm(model_dir, torch.float32)
        quantized = load_checkpoints(checkpoints, fp_model)
    paths = {FP_NAME: str(model_dir.resolve()), **{n: str(p.resolve()) for n, p in checkpoints.items()}}
    started = time.perf_counter()
    result = evaluate(
        fp_model,
        tokenizer,
        quantized,
        texts,
        max_tokens=args.max_tokens,
        seq_len=args.seq_len,
        progress=not args.quiet,
        model_paths=paths,
    )
    seconds = time.perf_counter() - started
    written = write_reports(result, args.out)
    print(markdown(result))
    print(f"evaluated {len(result.models)} models x {len(result.langs)} languages in {seconds:.1f}s")
    print("results: " + ", ".join(str(p) for p in written.values()))
    if judge is not None:
        _run_judge(args, judge, {FP_NAME: fp_model, **quantized}, tokenizer, paths)


_JUDGE_OPTIONS = (
    "judge_key",
    "judge_model",
    "judge_questions",
    "judge_categories",
    "judge_question_file",
    "judge_max_tokens",
    "judge_parallel",
)


@dataclass
class _JudgeSetup:
    """What the judge run needs, settled before any model is loaded."""

    client: JudgeClient
    questions: list[Question]
    source: str  # "packaged" or the user file's path


def _prepare_judge(args: argparse.Namespace) -> _JudgeSetup | None:
    """None without --judge-url; else the reachable judge and the chosen questions."""
    if not args.judge_url:
        stray = [o for o in _JUDGE_OPTIONS if getattr(args, o) is not None]
        if stray:
            raise UserError(f"--{stray[0].replace('_', '-')} needs --judge-url")
        return None
    from lape_awq.quant.evaluation.judge.client import JudgeClient
    from lape_awq.quant.evaluation.judge.questions import load_questions, select_questions

    for option in ("judge_max_tokens", "judge_parallel"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise UserError(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    questions, source = load_questions(args.judge_question_file)
    questions = select_questions(questions, args.judge_categories, args.judge_questions)
    key = args.judge_key or os.environ.get(KEY_ENV) or "EMPTY"
    return _JudgeSetup(JudgeClient.connect(args.judge_url, key, args.judge_model), questions, source)


def _run_judge(
    args: argparse.Namespace,
    judge: _JudgeSetup,
    models: dict[str, nn.Module],
    tokenizer: object,
    paths: dict[str, str],
) -> None:
    """Answers of every model, the judge on every pair; judge.md and judge.json next to the eval reports."""
    from lape_awq.quant.evaluation.judge.pairwise import run_judge
    from lape_awq.quant.evaluation.judge.report import markdown, write_reports

    started = time.perf_counter()
    result = run_judge(
        judge.client,
        models,
        tokenizer,
        judge.questions,
        question_source=judge.source,
        max_new_tokens=args.judge_max_tokens or DEFAULT_MAX_NEW_TOKENS,
        parallel=args.judge_parallel or DEFAULT_PARALLEL,
        progress=not args.quiet,
        model_paths=paths,
    )
    written = write_reports(result, args.out)
    print()
    print(markdown(result))
    print(
        f"judged {len(result.pairs)} pairs x {len(judge.questions)} questions with {judge.client.model} "
        f"in {time.perf_counter() - started:.1f}s"
    )
    print("judge results: " + ", ".join(str(p) for p in written.values()))


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
