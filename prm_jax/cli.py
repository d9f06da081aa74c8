"""`prm-jax` entry point. Each stage owns its subcommands in a `commands` module with
`register(subparsers)`; this file only wires them together."""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import traceback

from prm_jax.errors import InputError, RunError
from prm_jax.hugepages import hugepage_malloc_env

# Modules that define subcommands, in pipeline order.
COMMAND_MODULES = (
    "prm_jax.demo",
    "prm_jax.toyworld.commands",
    "prm_jax.sampling.commands",
    "prm_jax.labeling.commands",
    "prm_jax.training.commands",
    "prm_jax.evaluation.commands",
    "prm_jax.search.commands",
    "prm_jax.serving.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prm-jax", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error (also: PRM_JAX_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def run(argv: list[str] | None = None) -> int:
    """Run one subcommand and let its errors propagate (for tests and for embedding)."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. The project's errors, and OS errors on a named file, print as one line
    `prm-jax <command>: error: <message>` and exit 2 (bad input) or 1 (the run failed)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (InputError, RunError, OSError) as e:
        if args.debug or os.environ.get("PRM_JAX_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print(f"prm-jax {args.command}: error: {error_message(e)}", file=sys.stderr)
        status = 2 if isinstance(e, BAD_INPUT) else 1
    except Exception:
        if not _in_multi_process_run():
            raise
        traceback.print_exc()
        status = 1
    _leave_multi_process_run(args.command, status)
    return status


def _in_multi_process_run() -> bool:
    if "jax" not in sys.modules:  # nothing has started JAX, so no multi-process run either
        return False
    import jax

    return jax.distributed.is_initialized() and jax.process_count() > 1


def _leave_multi_process_run(command: str, status: int) -> None:
    """A process of a multi-process run that fails exits at once. Returning would run JAX's exit
    handler, which waits at a shutdown barrier for the other processes while they wait for this one
    inside a collective: measured, both hung until killed (> 300 s). Exiting without it, this process
    is gone in a moment and the others stop with an error when JAX's coordination service misses its
    heartbeat (100 s by default) instead of hanging."""
    if not _in_multi_process_run():
        return
    import jax

    print(f"prm-jax {command}: process {jax.process_index()} of {jax.process_count()} stops here; the other "
          f"processes stop when JAX's coordination service misses its heartbeat", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# Exit status 2: the input was wrong (a missing or unreadable named path included); 1: the run failed.
BAD_INPUT = (InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def error_message(e: BaseException) -> str:
    """One line: an OS error as `FILE: reason`, any other error's message with newlines folded."""
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or type(e).__name__}"
    return " ".join(str(e).split()) or type(e).__name__


def entry() -> int:
    """The `prm-jax` console script and `python -m prm_jax.cli`: `main` in a process whose large
    allocations use huge pages (see prm_jax.hugepages)."""
    env = hugepage_malloc_env(dict(os.environ), platform.libc_ver())
    if env is not None:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)  # same options and arguments
    return main()


if __name__ == "__main__":
    sys.exit(entry())
