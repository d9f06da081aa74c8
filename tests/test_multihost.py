"""Every computing stage as 2 JAX processes x 4 fake CPU devices (one 8-device mesh over gloo) against the
same stage run here in one process on 8 devices (tests/conftest.py).

JAX start-up and compilation dominate, so the multi-process side is three pairs of children
(tests/multihost.py), each running several stages in one process:
  A  sample, process 1 SIGKILLed mid-run (then the job is torn down, as a scheduler restarts a failed job)
  B  sample again (each process resumes its part file), rollout, train (SIGTERM to process 1 at step >= 2)
  C  train again (resumes), export, eval processbench, eval bon
The single-process reference runs the same stages in this process first.

Training across processes is not bitwise equal to one process: the cross-process all-reduce (gloo) adds
the 8 devices' partial sums in another order than XLA's in-process CPU all-reduce, so losses and gradients
differ in the last float32 bit from the second step on (the first step's loss and gradient norm agree
bitwise). The parameters are compared with a tolerance of a few float32 ulps of drift instead (Adam's eps
is raised to 1e-3 so the key-projection bias, whose exact gradient is zero, does not turn rounding noise
into full-size updates). The export is byte-compared across the two sides on the same checkpoint; the
evaluations score the single-process export on both sides and are compared exactly.
"""
import json
import os
import random
import re
import resource
import signal
import sys
import time

import numpy as np
import pytest

from multihost import MultiHost
from prm_jax import cli
from prm_jax.records import part_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RECIPE = os.path.join(REPO, "experiments", "recipes", "tiny-cpu.yaml")
SETS = ["steps=6", "save_every=6", "keep=3", "log_every=1", "max_length=64", "buckets=[64]", "lr=1e-2",
        "eps=1e-3", "mesh=fsdp=8", "export_hf=false", "eval_every=0"]
PROBLEM = "Tom has {} apples and buys 12 more. Step 1: 7 * 8 = 56. How many apples does he have?"
N_PROBLEMS = 12
PAIR_TIMEOUT = 150  # seconds a pair of children may take before the test fails (and they are killed)


def _write_jsonl(path, recs):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _parts(path):
    return [part_path(path, i, 2) for i in range(2)]


def _clock(t0, what):
    """Wall and CPU seconds so far (this process and its reaped children), for `pytest -s` timing."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    print(f"multihost timing: {what}: {time.perf_counter() - t0:.1f}s wall, {cpu:.1f}s CPU", file=sys.stderr)


def _wait_for(predicate, job, timeout, what, child):
    """Poll `predicate` until true; the test fails (children killed) at the deadline or if `child` exits first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline or job.procs[child].poll() is not None:
            job.kill()
            pytest.fail(f"gave up waiting for {what}\n{job.report()}")
        time.sleep(0.01)


def _lines(path):
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        return f.read().count(b"\n")


def _train_rows(metrics):
    return [r for r in _read_jsonl(metrics) if r.get("split") != "eval"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, toy_tokenizer_dir, toy_tokenizer):
    from flax import nnx

    from prm_jax.models.hf import save_hf
    from prm_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("multihost")
    policy = str(root / "policy")
    save_hf(Qwen2ForCausalLM(Qwen2Config.preset("tiny", vocab_size=len(toy_tokenizer)), nnx.Rngs(0)), policy,
            tokenizer_dir=toy_tokenizer_dir)
    problems = str(root / "problems.jsonl")
    _write_jsonl(problems, [{"id": f"p{i}", "problem": PROBLEM.format(i), "answer": str(i + 12)}
                            for i in range(N_PROBLEMS)])
    rng = random.Random(0)
    train_file = str(root / "train.jsonl")
    recs = []
    for i in range(40):
        steps = [rng.choice(["Tom has 3 apples", "15 * 4 = 60", "60 - 7 = 53"]) for _ in range(rng.randint(1, 3))]
        recs.append({"id": i, "problem": "How many apples?", "steps": steps,
                     "labels": [int("apples" in s) for s in steps]})
    _write_jsonl(train_file, recs)
    bench = root / "bench"
    bench.mkdir()
    pb = [{"id": f"t{i}", "generator": "toy", "problem": "How many apples?", "steps": r["steps"],
           "final_answer_correct": all(r["labels"]), "label": r["labels"].index(0) if 0 in r["labels"] else -1}
          for i, r in enumerate(recs[:12])]
    (bench / "toy.json").write_text(json.dumps(pb))

    def sample(out):
        return ["sample", "--policy", policy, "--problems", problems, "--out", out, "--n", "2", "--batch-size", "1",
                "--max-new-tokens", "8", "--no-progress", "--grade-workers", "0"]

    def rollout(solutions, out):
        return ["rollout", "--policy", policy, "--solutions", solutions, "--out", out, "--n", "2", "--batch-size",
                "1", "--max-prefixes", "1", "--max-new-tokens", "8", "--no-progress", "--grade-workers", "0"]

    def train(out):
        return ["train", "--init-config", "tiny", "--tokenizer", toy_tokenizer_dir, "--train", train_file, "--out",
                out, "--config", TINY_RECIPE, "--quiet", *[a for s in SETS for a in ("--set", s)]]

    def evals(prm, out):
        common = ["--prm", prm, "--max-length", "128", "--batch-size", "8", "--no-plots", "--system-prompt", "",
                  "--scoring-dtype", "float32"]
        return [["eval", "processbench", *common, "--data", str(bench), "--subsets", "toy", "--out", f"{out}/pb"],
                ["eval", "bon", *common, "--responses", sp["sample"], "--out", f"{out}/bon"]]

    # -- the single-process reference, in this process (8 devices) --------------------------------
    sp = {k: str(root / "sp" / k) for k in ("sample", "rollout", "train", "export", "eval")}
    os.makedirs(root / "sp")
    t0 = time.perf_counter()
    for argv in (sample(sp["sample"]), rollout(sp["sample"], sp["rollout"]), train(sp["train"]),
                 ["export", "--checkpoint", sp["train"], "--out", sp["export"]], *evals(sp["export"], sp["eval"])):
        assert cli.main(argv) == 0, argv
        _clock(t0, f"single-process {argv[0]}")

    # -- the same stages as 2 processes x 4 devices --------------------------------------------------
    mp = {k: str(root / "mp" / k) for k in ("sample", "rollout", "train", "export", "eval")}
    os.makedirs(root / "mp")
    out = {}
    # One compilation cache for the three pairs: B and C reuse what A and B compiled (sampler, train step).
    cache = {"JAX_COMPILATION_CACHE_DIR": str(root / "jax-cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    with MultiHost(n=2, devices=4, env=cache) as job:  # A: process 1 killed by SIGKILL mid-sample
        job.start([sample(mp["sample"])])
        part1 = _parts(mp["sample"])[1]
        _wait_for(lambda: _lines(part1) >= 2, job, PAIR_TIMEOUT, f"2 records in {part1}", child=1)
        job.procs[1].kill()
        out["killed_with"] = _lines(part1)
        _clock(t0, "pair A")
        job.kill()  # the job goes down with its task, as under a scheduler; B restarts it
    # B: restart; rollout; train, SIGTERM to process 1 at step 2 (steps pause 2 s until it is seen: no race)
    with MultiHost(n=2, devices=4, env={**cache, "MULTIHOST_STEP_PAUSE": "2"}) as job:
        job.start([sample(mp["sample"]), rollout(sp["sample"], mp["rollout"]), train(mp["train"])])
        metrics = os.path.join(mp["train"], "metrics.jsonl")
        _wait_for(lambda: os.path.exists(metrics) and any(r["step"] >= 2 for r in _train_rows(metrics)), job,
                  PAIR_TIMEOUT, f"step 2 in {metrics}", child=0)
        job.signal(1, signal.SIGTERM)
        out["sigterm_codes"] = job.wait(PAIR_TIMEOUT, ok=(0, 143))
        out["restart_stderr"] = job.stderr(1)
        out["preempted_stdout"] = [job.output(i) for i in range(2)]
        _clock(t0, "pair B")
        out["preempted_steps"] = sorted(int(s) for s in os.listdir(os.path.join(mp["train"], "checkpoints"))
                                        if s.isdigit())
    with MultiHost(n=2, devices=4, env=cache) as job:  # C: resume train; export; evaluations (of the same PRM as sp)
        job.start([train(mp["train"]), ["export", "--checkpoint", sp["train"], "--out", mp["export"]],
                   *evals(sp["export"], mp["eval"])])
        job.wait(PAIR_TIMEOUT)
        out["resumed_stdout"] = job.output(0)
        _clock(t0, "pair C")
    return {"sp": sp, "mp": mp, "inputs": {"sample": problems, "rollout": sp["sample"]}, "train_argv": train, **out}


def _stored(run_dir, step):
    """(params as numpy, data-iterator state) of a saved step, restored onto this process's first device."""
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from prm_jax.training import checkpoint as ck

    model, _, _ = ck.load_model(run_dir, step)
    c = ck.Checkpointer(os.path.join(run_dir, "checkpoints"))
    try:
        data = c.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    finally:
        c.close()
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model))), data


def test_train_across_processes_preempts_everywhere_resumes_and_matches_one_process(runs):
    import jax

    sp, mp = runs["sp"], runs["mp"]
    # SIGTERM to process 1 alone: both processes agreed on a step, saved it, and exited 143
    assert runs["sigterm_codes"] == [143, 143], runs["sigterm_codes"]
    stopped = runs["preempted_steps"][-1]
    assert 2 <= stopped < 6
    for text in runs["preempted_stdout"]:
        assert f"preempted: prm step {stopped}/6" in text
    assert f"completed: prm step 6/6 (resumed from {stopped})" in runs["resumed_stdout"]
    # metrics.jsonl written by process 0 alone: one row per step, through the preemption and the resume
    assert [r["step"] for r in _train_rows(os.path.join(mp["train"], "metrics.jsonl"))] == list(range(1, 7))
    sp_rows = _train_rows(os.path.join(sp["train"], "metrics.jsonl"))
    mp_rows = _train_rows(os.path.join(mp["train"], "metrics.jsonl"))
    assert (mp_rows[0]["loss"], mp_rows[0]["grad_norm"]) == (sp_rows[0]["loss"], sp_rows[0]["grad_norm"])
    # the orbax checkpoint holds both processes' shards (fsdp spans them)
    for item in ("params", "opt_state"):
        for i in range(2):
            shard_dir = os.path.join(mp["train"], "checkpoints", "6", item, f"ocdbt.process_{i}")
            assert os.path.isdir(shard_dir) and os.listdir(os.path.join(shard_dir, "d")), shard_dir
    (pa, da), (pb, db) = _stored(sp["train"], 6), _stored(mp["train"], 6)
    assert da == db  # the data iterator stands at the same place
    la, lb = jax.tree.leaves(pa), jax.tree.leaves(pb)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):  # see the module docstring for why not bitwise
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=2e-6)


def test_export_across_processes_is_byte_identical(runs):
    sp, mp = runs["sp"], runs["mp"]
    names = sorted(os.listdir(sp["export"]))
    assert names == sorted(os.listdir(mp["export"]))
    for name in names:  # the same checkpoint exported by 2 processes and by 1: the same bytes
        with open(os.path.join(sp["export"], name), "rb") as f, open(os.path.join(mp["export"], name), "rb") as g:
            assert f.read() == g.read(), name


@pytest.mark.parametrize("stage", ["sample", "rollout"])
def test_sample_and_rollout_shard_by_process_and_merge_to_the_one_process_output(runs, stage):
    sp, mp = runs["sp"], runs["mp"]
    want = {r["id"]: r for r in _read_jsonl(sp[stage])}
    parts = [_read_jsonl(p) for p in _parts(mp[stage])]
    ids = [r["id"] for part in parts for r in part]
    assert sorted(ids) == sorted(want) and len(set(ids)) == len(ids)  # every id exactly once
    inputs = [r["id"] for r in _read_jsonl(runs["inputs"][stage])]
    for i, part in enumerate(parts):  # each process took its strided shard of the input
        assert {r["problem_id"] if stage == "sample" else r["id"] for r in part} == set(inputs[i::2])
    assert {r["id"]: r for part in parts for r in part} == want


def test_sample_restarted_after_sigkill_finishes_without_duplicates(runs):
    killed_with = runs["killed_with"]
    assert 2 <= killed_with < N_PROBLEMS  # process 1 died with part of its 12 records written
    done = re.search(rf"sample: {N_PROBLEMS // 2} problems, (\d+) already done", runs["restart_stderr"])
    assert done and killed_with // 2 <= int(done.group(1)) < N_PROBLEMS // 2, runs["restart_stderr"][-2000:]


@pytest.mark.parametrize("name", ["pb/predictions.jsonl", "pb/summary.json", "bon/scores.jsonl",
                                  "bon/bon_summary.json"])
def test_eval_across_processes_gives_the_same_predictions_and_summary(runs, name):
    a, b = os.path.join(runs["sp"]["eval"], name), os.path.join(runs["mp"]["eval"], name)
    if name.endswith(".jsonl"):
        key = "key" if name.startswith("pb") else "id"
        assert sorted(_read_jsonl(a), key=lambda r: r[key]) == sorted(_read_jsonl(b), key=lambda r: r[key])
    else:
        with open(a) as f, open(b) as g:  # all but the scoring run's own timings and throughput
            sa, sb = json.load(f), json.load(g)
        assert {k: v for k, v in sa.items() if k != "scoring"} == {k: v for k, v in sb.items() if k != "scoring"}
        assert sa.get("scoring", {}).get("items") == sb.get("scoring", {}).get("items")


def _subparser(parser, *names):
    import argparse

    for name in names:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize("stage", ["sample", "rollout", "judge", "train", "export", "eval processbench", "eval bon",
                                   "search", "serve"])
def test_every_computing_stage_takes_the_distributed_flags(stage):
    p = _subparser(cli.build_parser(), *stage.split())
    flags = {o for a in p._actions for o in a.option_strings}
    assert {"--coordinator", "--num-processes", "--process-id"} <= flags


def test_distributed_spec_reads_flags_then_environment_then_cluster_detection(capsys):
    from prm_jax.errors import InputError
    from prm_jax.parallel.mesh import DistributedSpec, distributed_spec

    def args(*flags):
        return cli.build_parser().parse_args(["export", "--checkpoint", "c", "--out", "o", *flags])

    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    given = args("--coordinator", "host:8476", "--num-processes", "2", "--process-id", "1")
    assert distributed_spec(given, env) == DistributedSpec("flags", "host:8476", 2, 1)  # flags win
    assert distributed_spec(args(), env) == DistributedSpec("environment", "10.0.0.1:1234", 4, 3)
    assert distributed_spec(args(), {"SLURM_JOB_ID": "7"}) == DistributedSpec("auto")
    assert distributed_spec(args(), {"TPU_WORKER_HOSTNAMES": "a,b"}) == DistributedSpec("auto")
    assert distributed_spec(args(), {}) is None and distributed_spec(None, {}) is None
    with pytest.raises(InputError, match="missing --process-id"):
        distributed_spec(args("--coordinator", "h:1", "--num-processes", "2"), {})
    with pytest.raises(InputError, match="JAX_PROCESS_ID must be a non-negative integer; got 'x'"):
        distributed_spec(args(), {**env, "JAX_PROCESS_ID": "x"})
    with pytest.raises(InputError, match=r"process id 2 \(from flags\) must be in 0..1"):
        distributed_spec(args("--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"), {})
    with pytest.raises(SystemExit):
        args("--coordinator", "no-port")
    assert "expected HOST:PORT" in capsys.readouterr().err


def test_harness_fails_on_a_crashed_child_with_its_stderr_and_kills_a_hung_one():
    from multihost import ChildFailed

    with MultiHost(n=2, devices=4) as job:  # both children refuse a bad flag (exit 2) at once
        job.start([["export", "--checkpoint", "c", "--out", "o", "--no-such-flag"]])
        with pytest.raises(ChildFailed, match=r"(?s)exited 2.*unrecognized arguments: --no-such-flag"):
            job.wait(60)
    with MultiHost(n=2, devices=4) as job:  # process 1 never starts: process 0 waits for it, forever
        job.start([["export", "--checkpoint", "c", "--out", "o"]], only=[0])
        t0 = time.monotonic()
        with pytest.raises(ChildFailed, match="still running after 3s"):
            job.wait(3)
        assert time.monotonic() - t0 < 15 and job.procs[0].poll() is not None  # killed and reaped


def test_a_process_that_fails_exits_at_once_instead_of_waiting_for_the_others(runs, tmp_path):
    """Process 1 fails after joining the run (its --out lies under a regular file) while process 0 trains, i.e. waits
    for it in a collective. Process 1 must exit at once with its one-line error. Returning normally, its exit went
    through JAX's shutdown barrier: here its error line was lost, and with process 0 in a collective loop both hung
    for over 300 s (measured by hand). Process 0 is left to the harness (JAX's heartbeat would stop it in 100 s)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with MultiHost(n=2, devices=4) as job:
        job.start([runs["train_argv"](str(tmp_path / "ok"))], only=[0])
        job.start([runs["train_argv"](str(blocker / "out"))], only=[1])
        t0 = time.monotonic()
        while job.procs[1].poll() is None and time.monotonic() - t0 < 60:
            time.sleep(0.1)
        assert job.procs[1].poll() == 2, job.report()
        err = job.stderr(1)
        assert f"prm-jax train: error: {blocker}" in err, err
        assert "process 1 of 2 stops here" in err and "Traceback" not in err, err
        assert job.procs[0].poll() is None  # process 0 still waits for process 1 (the harness kills it)
