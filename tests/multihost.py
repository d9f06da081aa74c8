"""Run prm-jax stages as N JAX processes on this machine: the harness of tests/test_multihost.py.

`MultiHost(n, devices)` launches N child processes, each with `devices` fake CPU devices, joined into one
JAX run through `--coordinator 127.0.0.1:<free port> --num-processes N --process-id I` (so N x devices
devices form one mesh over JAX's CPU collectives). A child runs one or more `prm-jax` commands one after
the other in the same process (the JAX start-up is paid once):

    with MultiHost() as job:
        job.start([["train", ...], ["export", ...]])
        job.wait(timeout=120)          # every child exited 0, or the test fails with their stderr

Every child is its own process group; a child still alive at the deadline, at a failure of another, or
when the `with` block is left (an assertion, Ctrl-C) is killed with its whole group and reaped, so a
hanging or crashing run fails the test and never hangs CI.

Run as a script, this file is that child: `python tests/multihost.py '<JSON list of argv lists>' -- FLAGS`
runs each argv through `prm_jax.cli.main` with FLAGS (the distributed flags) appended, and exits with the
first non-zero status.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    """A TCP port nobody listens on right now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(devices: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment with `devices` fake CPU devices (set before the child imports jax;
    the parent's own device count is replaced) and no inherited multi-process settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
                        "TPU_WORKER_HOSTNAMES")}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_FLAG)]
    env["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_FLAG}={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    env["PRM_JAX_TEST_PARENT"] = str(os.getpid())
    env.update(extra or {})
    return env


def _die_with_parent(parent: int) -> None:
    """In the child (after exec: no Python between fork and exec in a multithreaded test process): SIGKILL it
    when the test process dies (Linux), so even a killed pytest leaves no JAX process behind."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl
        os.kill(os.getpid(), signal.SIGKILL)


class ChildFailed(AssertionError):
    """A child exited non-zero or outlived its deadline; the message holds every child's stderr tail."""


class MultiHost:
    def __init__(self, n: int = 2, devices: int = 4, env: dict[str, str] | None = None):
        self.n, self.devices, self.extra_env = n, devices, env
        self.procs: list[subprocess.Popen] = []
        self.logs: list[tuple[str, str]] = []
        self._tmp = tempfile.TemporaryDirectory(prefix="multihost-")
        self.port = None

    def start(self, commands: list[list[str]], only: list[int] | None = None) -> "MultiHost":
        """Start the children (all N, or the process ids in `only`), each running `commands` in order."""
        self.port = self.port or free_port()
        env = child_env(self.devices, self.extra_env)
        for i in (range(self.n) if only is None else only):
            flags = ["--coordinator", f"127.0.0.1:{self.port}", "--num-processes", str(self.n), "--process-id", str(i)]
            out, err = (os.path.join(self._tmp.name, f"p{i}-{len(self.logs)}.{x}") for x in ("out", "err"))
            with open(out, "wb") as fo, open(err, "wb") as fe:
                self.procs.append(subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), json.dumps(commands), "--", *flags],
                    cwd=REPO, env=env, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, start_new_session=True))
            self.logs.append((out, err))
        return self

    def output(self, i: int) -> str:
        with open(self.logs[i][0], encoding="utf-8", errors="replace") as f:
            return f.read()

    def stderr(self, i: int) -> str:
        with open(self.logs[i][1], encoding="utf-8", errors="replace") as f:
            return f.read()

    def signal(self, i: int, sig: int) -> None:
        """Send `sig` to child i alone (not its group: the child's own worker processes are its business)."""
        self.procs[i].send_signal(sig)

    def wait(self, timeout: float, ok: tuple[int, ...] = (0,)) -> list[int]:
        """Wait for every child; a child exiting outside `ok`, or any still running at the deadline, kills
        the rest and raises ChildFailed with each child's status and stderr tail."""
        deadline = time.monotonic() + timeout
        while True:
            codes = [p.poll() for p in self.procs]
            bad = [i for i, c in enumerate(codes) if c is not None and c not in ok]
            late = time.monotonic() > deadline
            if bad or late:
                self.kill()
                why = f"child {bad[0]} exited {codes[bad[0]]}" if bad else f"still running after {timeout:.0f}s"
                raise ChildFailed(f"multi-process run failed: {why}\n" + self.report())
            if all(c is not None for c in codes):
                return codes
            time.sleep(0.05)

    def report(self) -> str:
        parts = []
        for i, p in enumerate(self.procs):
            parts.append(f"--- child {i} (status {p.poll()}) stderr tail ---\n{self.stderr(i)[-3000:]}")
        return "\n".join(parts)

    def kill(self) -> None:
        """SIGKILL every child's process group and reap it."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            p.wait()

    def __enter__(self) -> "MultiHost":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
        self._tmp.cleanup()


def _slow_steps(pause: float) -> None:
    """Make every training step that has not seen a stop request wait `pause` seconds (env MULTIHOST_STEP_PAUSE):
    a SIGTERM sent at step 2 then reaches every process through JAX's preemption sync before the run's last
    step however loaded the machine is, instead of racing a few fast steps."""
    from prm_jax.training.trainer import Preemption

    requested = Preemption.requested

    def slow(self, step: int) -> bool:
        stop = requested(self, step)
        if not stop:
            time.sleep(pause)
        return stop

    Preemption.requested = slow


def _child(argv: list[str]) -> int:
    """Run the JSON list of prm-jax argvs in argv[0], each with the flags after `--` appended."""
    if os.environ.get("PRM_JAX_TEST_PARENT", "").isdigit():
        _die_with_parent(int(os.environ["PRM_JAX_TEST_PARENT"]))
    if os.environ.get("MULTIHOST_STEP_PAUSE"):
        _slow_steps(float(os.environ["MULTIHOST_STEP_PAUSE"]))
    from prm_jax.cli import main

    commands, flags = json.loads(argv[0]), argv[argv.index("--") + 1:]
    for command in commands:
        print(f"multihost child: prm-jax {' '.join(command)}", file=sys.stderr, flush=True)
        rc = main([*command, *flags])
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
