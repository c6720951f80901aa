"""The `model` subcommand: prepare or locate the embedded default model."""

from __future__ import annotations

import argparse
import sys


def add_model_command(sub: argparse._SubParsersAction) -> None:
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
