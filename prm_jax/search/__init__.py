"""PRM-guided test-time search: best-of-N, step-level beam search and DVTS (see search.run).

`prm_jax.search(policy, prm, problems, ...)` is the API. This package has the same name, and
importing a submodule (the CLI imports search.commands) binds `prm_jax.search` to the package, so
the package itself is callable: calling it calls run.search (imported lazily, so the CLI's --help
does not start JAX)."""
from __future__ import annotations

import sys
import types


def search(*args, **kwargs):
    from prm_jax.search.run import search as run_search

    return run_search(*args, **kwargs)


search.__doc__ = "prm_jax.search.run.search: see there."


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
__all__ = ["search"]
