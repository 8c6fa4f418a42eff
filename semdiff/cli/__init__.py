"""The ``semdiff`` command line.

Each module in this package adds its sub-commands through ``register(subparsers)``; a sub-command
stores its handler as ``func`` (called with the parsed namespace, returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute sub-commands, in the order they appear in ``--help``.
COMMAND_MODULES = [
    "semdiff.cli.models",
    "semdiff.cli.hub",
    "semdiff.cli.convert",
    "semdiff.cli.train",
    "semdiff.cli.features",
    "semdiff.cli.prior",
]


class CLIError(Exception):
    """An error the CLI reports as one line on stderr with exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semdiff", description="Semantic diffusion autoencoders.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # a command module not written yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from semdiff import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except KeyError as err:  # unknown model or attribute names: the message is the first argument
        print(f"semdiff {args.command}: error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    except (CLIError, ValueError, FileNotFoundError, OSError) as err:
        print(f"semdiff {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
