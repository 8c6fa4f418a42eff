"""``semdiff convert FAMILY ...``: official checkpoint -> semdiff model folder.

Each family's ``semdiff.families.<family>.convert`` module provides ``add_cli_arguments(parser)``
and ``run_cli(args) -> Path``; this module only dispatches.
"""

from __future__ import annotations

import importlib

CONVERTIBLE_FAMILIES = ["diffae", "diffusevae", "lrdm"]


def register(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="convert an official checkpoint into a semdiff model folder")
    families = parser.add_subparsers(dest="family", metavar="FAMILY", required=True)
    for family in CONVERTIBLE_FAMILIES:
        try:
            module = importlib.import_module(f"semdiff.families.{family}.convert")
        except ModuleNotFoundError:
            continue
        sub = families.add_parser(family, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_cli_arguments(sub)
        sub.set_defaults(func=lambda args, m=module: _run(m, args))


def _run(module, args) -> int:
    out = module.run_cli(args)
    print(f"wrote {out}")
    return 0
