"""argparse value types that refuse a bad value before any work starts: argparse prints
`prm-jax CMD: error: argument --flag: ...` and exits 2, so no model loads and no output is made."""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sized

from prm_jax.errors import InputError


def _number(kind: type, ok: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


positive_int = _number(int, lambda v: v >= 1, ">= 1")
nonneg_int = _number(int, lambda v: v >= 0, ">= 0")
positive_float = _number(float, lambda v: v > 0, "> 0")
nonneg_float = _number(float, lambda v: v >= 0, ">= 0")
top_p = _number(float, lambda v: 0 < v <= 1, "in (0, 1]")
unit_interval = _number(float, lambda v: 0 <= v <= 1, "in [0, 1]")


def model_dir(text: str) -> str:
    """A local Hugging Face model directory (one with config.json); nothing is downloaded at run time."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: no such directory (expected a local model directory "
                                         "with config.json)")
    if not os.path.isfile(os.path.join(text, "config.json")):
        raise argparse.ArgumentTypeError(f"{text}: not a model directory (no config.json)")
    return text


def input_file(text: str) -> str:
    """An existing file to read."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return text


def add_allow_empty(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-empty", action="store_true",
                        help="accept an input with no records (default: an error, as it usually means a wrong "
                             "path or an upstream stage that produced nothing)")


def require_records(records: Sized, path: str, allow_empty: bool) -> None:
    """Refuse an input file with no records unless --allow-empty."""
    if not len(records) and not allow_empty:
        raise InputError(f"0 records in {path}; expected at least one (pass --allow-empty to accept an empty input)")
