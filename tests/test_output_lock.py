"""One writer per output: a second run on the same output (or demo/eval directory) stops at once,
naming the holder, and a killed holder's lock is taken over (records.OutputLock)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prm_jax import demo as demo_module
from prm_jax.evaluation.best_of_n import run_bon
from prm_jax.evaluation.processbench import run_processbench
from prm_jax.labeling.judge import judge_solutions, load_template
from prm_jax.labeling.solutions import Solution
from prm_jax.labeling.judge_clients import OpenAIClient, SamplingParams
from prm_jax.records import OutputLockedError, RecordError, ResumableWriter

sys.path.insert(0, str(Path(__file__).parent))
from judge_fixture import JudgeFixture  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TORN = b'{"id": "torn'  # a line in progress

# A second process that takes an output and holds it until its stdin closes (or it is killed).
HOLDER = r"""
import os, sys
from prm_jax.records import OutputLock, ResumableWriter
kind, path = sys.argv[1], sys.argv[2]
if kind == "writer":
    w = ResumableWriter(path)
    for i in range(int(sys.argv[3])):
        w.write({"id": i})
    os.write(w._fd, sys.argv[4].encode())
else:
    lock = OutputLock(path, sys.argv[3])
print("ready", flush=True)
sys.stdin.read()
"""

# The same small resumable write loop any stage runs; a refused run retries until it gets the output.
LOOP = r"""
import os, sys, time
from prm_jax.records import OutputLockedError, ResumableWriter
path, go, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
while not os.path.exists(go):
    time.sleep(0.001)
refused = 0
while True:
    try:
        w = ResumableWriter(path)
    except OutputLockedError:
        refused += 1
        time.sleep(0.005)
        continue
    with w:
        for i in range(n):
            if i not in w.done:
                w.write({"id": i, "by": os.getpid()})
                time.sleep(0.002)
    break
print(refused)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}


@contextlib.contextmanager
def holder(*args: str):
    """A live second process holding an output (HOLDER's arguments); killed on exit if still alive."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, *map(str, args)], env=_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line == "ready\n", proc.stderr.read()
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdin.close(), proc.stdout.close(), proc.stderr.close()


def ids_in(path) -> list:
    return [json.loads(line)["id"] for line in Path(path).read_text().splitlines()]


def test_second_writer_in_one_process_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "out.jsonl"
    first = ResumableWriter(out)
    first.write({"id": 1})
    t0 = time.time()
    with pytest.raises(OutputLockedError) as e:
        ResumableWriter(out)
    msg = str(e.value)
    assert isinstance(e.value, RuntimeError) and "\n" not in msg
    m = re.fullmatch(rf"{re.escape(str(out))} is being written by pid {os.getpid()} on host "
                     rf"{re.escape(socket.gethostname())} since (\S+ \S+) \S+ \(this process: .*\); "
                     r"wait for it or stop it \(lock file .*out\.jsonl\.lock\)", msg)
    assert m, msg
    assert abs(time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) - t0) < 60
    first.close()
    assert not (tmp_path / "out.jsonl.lock").exists()  # released (and tidied) on close
    with holder("writer", out, 3, "") as proc:  # another process takes it: it prints "ready" only once it holds it
        with pytest.raises(OutputLockedError, match=f"by pid {proc.pid} "):
            ResumableWriter(out)
    assert ids_in(out) == [1, 0, 2]


def test_a_writer_that_fails_to_open_releases_its_lock(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 1}\nnot json\n')
    with pytest.raises(RecordError, match="out.jsonl:2"):
        ResumableWriter(out)
    out.write_text('{"id": 1}\n')
    with ResumableWriter(out) as w:
        assert w.done == {1}
        with pytest.raises(OutputLockedError):  # held again, by this one
            ResumableWriter(out)


def test_a_live_holder_in_another_process_is_named_and_its_output_left_alone(tmp_path):
    out = tmp_path / "out.jsonl"
    with holder("writer", out, 3, TORN.decode()) as proc:
        before = out.read_bytes()
        assert before.endswith(TORN)
        with pytest.raises(OutputLockedError, match=rf"^{re.escape(str(out))} is being written by pid {proc.pid} "
                                                    rf"on host {re.escape(socket.gethostname())} since .*; wait for "
                                                    r"it or stop it"):
            ResumableWriter(out)
        # Refused before the tail repair: the holder's line in progress is still there.
        assert out.read_bytes() == before


def test_a_killed_holder_is_taken_over_and_the_output_resumes_without_duplicates(tmp_path):
    out, lock_file = tmp_path / "out.jsonl", tmp_path / "out.jsonl.lock"
    with holder("writer", out, 5, TORN.decode()) as proc:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert json.loads(lock_file.read_text())["pid"] == proc.pid  # left behind, naming the dead holder
    with ResumableWriter(out) as w:
        assert (w.resumed, w.repaired_bytes) == (5, len(TORN))
        assert json.loads(lock_file.read_text()) | {"since": None} == {
            "pid": os.getpid(), "host": socket.gethostname(), "since": None}
        written = [w.write({"id": i}) for i in range(10)]
    assert written == [False] * 5 + [True] * 5
    assert ids_in(out) == list(range(10))


def test_two_concurrent_writers_never_duplicate_a_record(tmp_path):
    out, go, n = tmp_path / "out.jsonl", tmp_path / "go", 40
    procs = [subprocess.Popen([sys.executable, "-c", LOOP, str(out), str(go), str(n)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(0.5)  # both started and waiting
    go.touch()
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    assert ids_in(out) == list(range(n))


def _judge(out, sols, url):
    async def go():
        async with OpenAIClient(url, "judge-m", SamplingParams(), concurrency=2) as client:
            return await judge_solutions(sols, client, out_path=str(out), template=load_template("default"),
                                         model="judge-m", progress=False)
    return asyncio.run(go())


def test_a_second_judge_on_a_held_output_sends_nothing(tmp_path):
    out = tmp_path / "judge.jsonl"
    sols = [Solution({"id": i, "problem": f"Problem {i}. [first_error=-1]", "steps": ["a", "b"]}, f"mem:{i}")
            for i in range(3)]
    with JudgeFixture() as fx, holder("writer", out, 1, "") as proc:
        with pytest.raises(OutputLockedError, match=rf"^{re.escape(str(out))} is being written by pid {proc.pid} "):
            _judge(out, sols, fx.url)
        assert fx.counts["requests"] == 0 and ids_in(out) == [0]
    # Once it is free, the judge's two writers (output and reply cache) do not lock each other out.
    with JudgeFixture() as fx:
        summary = _judge(out, sols, fx.url)
    assert (summary.resumed, summary.judged) == (1, 2) and ids_in(out) == [0, 1, 2]
    assert not list(tmp_path.glob("*.lock"))


def test_a_demo_on_a_directory_another_run_holds_stops_before_touching_it(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    lock_path = run / demo_module.LOCK_FILE
    # Were the lock missed, stop at once rather than run the demo.
    monkeypatch.setattr(demo_module, "_compilation_cache", lambda path: None)
    monkeypatch.setattr(demo_module.Demo, "stages", lambda self: [])
    with holder("lock", run, lock_path) as proc:
        with pytest.raises(OutputLockedError, match=rf"^{re.escape(str(run))} is being written by pid {proc.pid} "):
            demo_module.run_demo(str(run), "tiny", resume=True, quiet=True)
        assert os.listdir(run) == [demo_module.LOCK_FILE]  # no stages/, no settings written


@pytest.mark.parametrize("command", ["processbench", "bon"])
def test_an_eval_on_a_directory_another_run_holds_stops_before_touching_it(tmp_path, command):
    out = tmp_path / "eval"
    out.mkdir()
    with holder("lock", out, out / "eval.lock") as proc:
        with pytest.raises(OutputLockedError, match=rf"^{re.escape(str(out))} is being written by pid {proc.pid} "):
            if command == "processbench":  # the lock comes before anything reads the data or the PRM
                run_processbench(None, str(tmp_path / "no-data"), str(out))
            else:
                run_bon(None, str(tmp_path / "no-responses.jsonl"), out_dir=str(out))
        assert os.listdir(out) == ["eval.lock"]
