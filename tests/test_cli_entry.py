"""The console entry restarts itself once with glibc's huge-page tunable (see
prm_jax.hugepages.hugepage_malloc_env) and then runs the command line it was given."""
import os
import subprocess
import sys

import pytest

from prm_jax.hugepages import HUGEPAGE_TUNABLE, hugepage_malloc_env

GLIBC = ("glibc", "2.36")


def test_env_adds_the_tunable_once_and_keeps_the_users():
    env = hugepage_malloc_env({"PATH": "/bin"}, GLIBC)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": HUGEPAGE_TUNABLE, "PRM_JAX_HUGEPAGES": "0"}
    assert hugepage_malloc_env(env, GLIBC) is None  # the restarted process does not restart again
    mine = hugepage_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC)
    assert mine["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + HUGEPAGE_TUNABLE


@pytest.mark.parametrize("environ, libc", [
    ({}, ("", "")),  # not glibc (musl, macOS): the tunable means nothing
    ({"PRM_JAX_HUGEPAGES": "0"}, GLIBC),  # turned off
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC),  # the user's own choice stands
])
def test_env_leaves_alone(environ, libc):
    assert hugepage_malloc_env(environ, libc) is None


@pytest.mark.skipif(hugepage_malloc_env({}, __import__("platform").libc_ver()) is None, reason="not glibc")
def test_entry_restarts_once_with_the_tunable_then_runs_the_command():
    code = ("import os, sys; print('tunables', os.environ.get('GLIBC_TUNABLES'), flush=True); "
            "sys.argv = ['prm-jax', 'filter', '--help']; from prm_jax.cli import entry; entry()")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "PRM_JAX_HUGEPAGES")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["tunables None", f"tunables {HUGEPAGE_TUNABLE}"], proc.stdout[:500] + proc.stderr[-2000:]
    assert proc.returncode == 0 and "usage: prm-jax filter" in proc.stdout
