"""`prm-jax sample` and `prm-jax rollout` end to end on a tiny random policy: record formats, resume,
kill -9 mid-run, raw GSM8K / MATH-500 input, bad input errors.

Compilation dominates the cost here, so every run uses the same sampler shapes: one prompt per
sampler call (--batch-size 1 / --max-prefixes 1), n = 2, and prompts whose lengths share one
length bucket (129..192 tokens), so the whole module compiles one prefill and one decode program.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from prm_jax.cli import main, run
from prm_jax.records import RecordError
from prm_jax.sampling.commands import read_problems

N_NEW = 8
PROBLEM = ("Tom has {} apples and buys 12 more. Step 1: 7 * 8 = 56. Step 2: 56 / 2 = 28. So the total is 28 "
           "dollars. How many apples does he have?")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, toy_tokenizer_dir, toy_tokenizer):
    from flax import nnx

    from prm_jax.models.hf import save_hf
    from prm_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config.preset("tiny", vocab_size=len(toy_tokenizer)), nnx.Rngs(0))
    out = tmp_path_factory.mktemp("tiny_policy") / "tiny-policy"
    save_hf(model, out, tokenizer_dir=toy_tokenizer_dir)
    return str(out)


def write_lines(path, recs):
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]  # every line must parse


def problems(k, start=0):
    return [{"id": f"p{i}", "problem": PROBLEM.format(i), "answer": str(i + 12), "source": "toy"}
            for i in range(start, start + k)]


def sample_args(policy, probs, out, *extra):
    return ["sample", "--policy", policy, "--problems", str(probs), "--out", str(out), "--n", "2",
            "--batch-size", "1", "--max-new-tokens", str(N_NEW), "--no-progress", "--grade-workers", "0", *extra]


def test_sample_records_and_resume(policy_dir, tmp_path, capsys):
    probs = tmp_path / "problems.jsonl"
    write_lines(probs, problems(2))
    out = tmp_path / "solutions.jsonl"
    assert main(sample_args(policy_dir, probs, out)) == 0
    recs = read_lines(out)
    assert sorted(r["id"] for r in recs) == ["p0-0", "p0-1", "p1-0", "p1-1"]
    for r in recs:
        assert r["generator"] == "tiny-policy" and r["source"] == "toy"  # unknown keys kept
        assert r["answer"] == str(int(r["problem_id"][1:]) + 12) and r["problem"] == PROBLEM.format(r["problem_id"][1:])
        assert isinstance(r["steps"], list) and all(isinstance(s, str) and s.strip() == s and s for s in r["steps"])
        assert r["final_answer"] is None or isinstance(r["final_answer"], str)
        assert r["final_answer_correct"] is False  # a random policy does not write "\boxed{12}"
    printed = capsys.readouterr().out
    assert "sample: wrote 4 solutions for 2 problems" in printed and "accuracy 0.000 (0/4)" in printed

    assert main(sample_args(policy_dir, probs, out)) == 0  # restart: nothing left to do
    assert "wrote 0 solutions" in capsys.readouterr().out
    assert read_lines(out) == recs
    write_lines(probs, problems(3))  # a new problem: only it is generated
    assert main(sample_args(policy_dir, probs, out)) == 0
    assert "wrote 2 solutions for 1 problems" in capsys.readouterr().out
    assert [r["id"] for r in read_lines(out)][4:] == ["p2-0", "p2-1"]


def test_read_raw_problem_files(shared_data):
    gsm = read_problems(str(shared_data / "gsm8k" / "test.jsonl"))
    assert len(gsm) == 1319 and gsm[0]["id"] == "gsm8k-0" and gsm[1]["id"] == "gsm8k-1"
    assert [g["answer"] for g in gsm[:3]] == ["18", "3", "70000"]  # the text after "####"
    assert gsm[0]["problem"].startswith("Janet\u2019s ducks lay 16 eggs per day.")
    math500 = read_problems(str(shared_data / "math500" / "test.jsonl"))
    assert len(math500) == 500 and math500[0]["id"] == "test/precalculus/807.json"
    assert math500[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert math500[0]["level"] == 2 and math500[0]["subject"] == "Precalculus"  # other keys kept


def test_bad_input_names_file_and_line(policy_dir, tmp_path):
    probs = tmp_path / "problems.jsonl"
    probs.write_text(json.dumps(problems(1)[0]) + "\n" + json.dumps({"id": "q", "answer": "1"}) + "\n")
    with pytest.raises(RecordError, match=r"problems.jsonl:2: missing key 'problem'"):
        run(sample_args(policy_dir, probs, tmp_path / "o.jsonl"))
    probs.write_text(json.dumps(problems(1)[0]) + "\n\n" + json.dumps(problems(1)[0]) + "\n")
    with pytest.raises(RecordError, match=r"problems.jsonl:3: duplicate id 'p0'"):
        run(sample_args(policy_dir, probs, tmp_path / "o.jsonl"))
    probs.write_text("{not json\n")
    with pytest.raises(RecordError, match=r"problems.jsonl:1: not valid JSON"):
        run(sample_args(policy_dir, probs, tmp_path / "o.jsonl"))
    sols = tmp_path / "sols.jsonl"
    sols.write_text(json.dumps({"id": "s", "problem": "p", "answer": "1", "steps": ["a", 3]}) + "\n")
    with pytest.raises(RecordError, match=r"sols.jsonl:1: key 'steps' should be a list of strings"):
        run(["rollout", "--policy", policy_dir, "--solutions", str(sols), "--out", str(tmp_path / "r.jsonl")])
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "r.jsonl").exists()


def test_rollout_modes(policy_dir, tmp_path, capsys):
    # The gold answer sits boxed in each solution's last step and nowhere else, and a random tiny
    # policy does not write a \boxed{} in 8 tokens. So the last step, the finished solution itself,
    # counts 2 without a rollout, and from any earlier prefix none reaches it (count 0). That is a
    # non-monotone solution for K >= 2, which shows binary mode's assumption at work: with K = 2 its
    # only probe (step 1) is positive, so it concludes "no error".
    steps = ["3 + 0 = 3", "3 + 1 = 4", "So \\boxed{15}."]
    sols = [{"id": f"s{k}", "problem": PROBLEM.format(3), "answer": "15", "steps": steps[-k:], "extra": k}
            for k in (1, 2, 3)]
    path = tmp_path / "sols.jsonl"
    write_lines(path, sols)
    for mode, want_correct, want_first_error in [
        ("all", [[2], [0, 2], [0, 0, 2]], [-1, 0, 0]),
        ("first-error", [[2], [0, None], [0, None, None]], [-1, 0, 0]),
        # K=1: probe 0 (+) -> none. K=2: probe 1 (+) -> none. K=3: probe 1 (-), probe 0 (-) -> 0.
        ("binary", [[2], [None, 2], [0, 0, None]], [-1, -1, 0]),
    ]:
        out = tmp_path / f"mc_{mode}.jsonl"
        args = ["rollout", "--policy", policy_dir, "--solutions", str(path), "--out", str(out), "--n", "2",
                "--mode", mode, "--max-new-tokens", str(N_NEW), "--batch-size", "2", "--max-prefixes", "1",
                "--no-progress", "--grade-workers", "0"]
        assert main(args) == 0
        recs = read_lines(out)
        assert [r["id"] for r in recs] == ["s1", "s2", "s3"] and [r["extra"] for r in recs] == [1, 2, 3]
        assert [r["steps"] for r in recs] == [s["steps"] for s in sols]
        assert [r["mc"]["correct"] for r in recs] == want_correct, mode
        assert [r["mc"]["first_error"] for r in recs] == want_first_error, mode
        spent = [2 * sum(c is not None for c in r["mc"]["correct"][:-1]) for r in recs]  # last: no rollout
        assert [r["mc"]["rollouts"] for r in recs] == spent
        assert all(r["mc"]["n"] == 2 and r["mc"]["mode"] == mode and r["mc"]["threshold"] == 0 for r in recs)
        assert f"rollout: {sum(spent)} rollouts" in capsys.readouterr().out
        assert main(args) == 0  # restart: all done, nothing rewritten
        assert read_lines(out) == recs


def test_kill_9_then_resume(policy_dir, tmp_path):
    probs = tmp_path / "problems.jsonl"
    write_lines(probs, problems(30))
    out = tmp_path / "solutions.jsonl"
    args = sample_args(policy_dir, probs, out)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "prm_jax.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"finished or died before the kill: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stderr.close()
    assert 3 <= out.read_bytes().count(b"\n") < 60
    with open(out, "ab") as f:
        f.write(b'{"id": "p29-1", "problem": "torn')  # as if killed in the middle of a write
    assert main(args) == 0
    resumed = read_lines(out)
    ids = [r["id"] for r in resumed]
    assert len(ids) == 60 and set(ids) == {f"p{i}-{k}" for i in range(30) for k in range(2)}
    # Sampling is keyed by problem id and sample index, so the interrupted run wrote exactly what
    # an uninterrupted one writes.
    fresh = tmp_path / "fresh.jsonl"
    assert main(sample_args(policy_dir, probs, fresh)) == 0
    assert {r["id"]: r for r in read_lines(fresh)} == {r["id"]: r for r in resumed}
