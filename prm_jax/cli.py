"""`prm-jax` entry point. Each stage owns its subcommands in a `commands` module with
`register(subparsers)`; this file only wires them together."""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define subcommands, in pipeline order.
COMMAND_MODULES = (
    "prm_jax.demo",
    "prm_jax.toyworld.commands",
    "prm_jax.sampling.commands",
    "prm_jax.labeling.commands",
    "prm_jax.training.commands",
    "prm_jax.evaluation.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prm-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
