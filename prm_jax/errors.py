"""The project's error types. The CLI prints these as one line (`prm-jax <command>: error: ...`)
instead of a traceback; anything else escaping a command is a bug and keeps its traceback."""
from __future__ import annotations


class InputError(ValueError):
    """Bad input: a file, record, flag or setting that is not what was expected. The message names
    the file (and line), flag or key, and what was expected. CLI exit status 2."""


class RunError(RuntimeError):
    """A run that cannot go on for a reason outside the code: a server that never answered, an
    output held by another run, training that diverged. CLI exit status 1."""
