"""Large allocations on transparent huge pages, for the `prm-jax` console script.

XLA:CPU allocates a compiled step's temporaries afresh on every run, and glibc serves the large
ones with newly mapped 4 KiB pages, so every step page-faults its whole working set again. Measured
on the benchmark PRM (8x512 tokens, 2 CPU cores): ~600k page faults and 1.5 s of kernel time per
training step with 4 KiB pages, ~4k faults and 0.4-0.8 s with huge pages, and 7-10% less wall time
timing that step alone. Glibc reads its malloc tunables only at process start, so the console
script restarts itself once with the tunable set (`prm_jax.cli.entry`).
"""
from __future__ import annotations

HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def hugepage_malloc_env(environ: dict[str, str], libc: tuple[str, str]) -> dict[str, str] | None:
    """The environment to restart with so that glibc backs large allocations with transparent huge
    pages, or None when there is nothing to do (not glibc, already asked for, or turned off with
    PRM_JAX_HUGEPAGES=0)."""
    if libc[0] != "glibc" or environ.get("PRM_JAX_HUGEPAGES") == "0" or "malloc.hugetlb" in environ.get(
            "GLIBC_TUNABLES", ""):
        return None
    tunables = ":".join(t for t in (environ.get("GLIBC_TUNABLES"), HUGEPAGE_TUNABLE) if t)
    return {**environ, "GLIBC_TUNABLES": tunables, "PRM_JAX_HUGEPAGES": "0"}
