"""`lape-awq`: one command, subcommands contributed by each subpackage through entry points."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib.metadata import entry_points, version

from lape_awq.quant.errors import UserError

COMMAND_GROUP = "lape_awq.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lape-awq",
        description="Language-aware 4-bit quantization (LAPE + AWQ) and serving for Korean chat.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('lape-awq')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        try:
            add_command = ep.load()
        except ImportError as exc:  # one broken command must not take the others down
            broken = sub.add_parser(ep.name, help=f"(unavailable: {exc})")
            broken.set_defaults(run=_unavailable(ep.name, exc))
            continue
        add_command(sub)
    return parser


def _unavailable(name: str, exc: ImportError) -> Callable[[argparse.Namespace], None]:
    def run(_args: argparse.Namespace) -> None:
        raise UserError(f"command {name!r} is unavailable: {exc}")

    return run


def main(argv: list[str] | None = None) -> int:
    """Entry point; user mistakes end as one `lape-awq: error:` line and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        print(f"lape-awq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lape-awq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
