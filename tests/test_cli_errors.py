"""Bad input through the `prm-jax` CLI: one line `prm-jax <command>: error: <message>` on stderr,
exit 2 (bad input) or 1 (a failed run), no traceback (unless --debug), checked before any work so
no output is left behind."""
import json
import os
import subprocess
import sys

import pytest

from prm_jax.cli import main

CONTEXT = 96  # the tiny policy's max_position_embeddings


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, toy_tokenizer_dir, toy_tokenizer):
    from flax import nnx

    from prm_jax.models.hf import save_hf
    from prm_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config.preset("tiny", vocab_size=len(toy_tokenizer), max_position_embeddings=CONTEXT)
    out = tmp_path_factory.mktemp("err_policy") / "policy"
    save_hf(Qwen2ForCausalLM(cfg, nnx.Rngs(0)), out, tokenizer_dir=toy_tokenizer_dir)
    return str(out)


@pytest.fixture()
def files(tmp_path):
    """Inputs by name: good and bad problem / solution / data files."""
    good = {"id": "p0", "problem": "Tom has 3 apples and buys 12 more.", "answer": "15"}
    sol = {**good, "steps": ["3 + 12 = 15", "The answer is \\boxed{15}."]}
    paths = {
        "problems": [good],
        "problems_non_utf8": json.dumps(good).encode() + b"\n" + b'{"id": "p1", "problem": "caf\xe9"}\n',
        "problems_empty": b"",
        "problems_long": [{**good, "problem": "3 + 12 = 15 " * 200}],
        "solutions": [sol],
        "solutions_bad_steps": [{**sol, "steps": ["a", 3]}],
        "mc_bad_json": b'{"id": "s", "steps": []}\n{not json\n',
    }
    out = {}
    for name, content in paths.items():
        p = tmp_path / f"{name}.jsonl"
        p.write_bytes(content if isinstance(content, bytes) else
                      "".join(json.dumps(r) + "\n" for r in content).encode())
        out[name] = str(p)
    out["out"] = str(tmp_path / "out.jsonl")
    out["missing"] = str(tmp_path / "nowhere" / "x.jsonl")
    out["tmp"] = str(tmp_path)
    return out


def sample(policy, problems, out, *extra):
    return ["sample", "--policy", policy, "--problems", problems, "--out", out, "--no-progress",
            "--grade-workers", "0", "--max-new-tokens", "8", *extra]


# (name, argv from (policy_dir, files), exit status, the one line's message after "error: ")
CASES = [
    ("non-UTF-8 line", lambda p, f: sample(p, f["problems_non_utf8"], f["out"]), 2,
     "{problems_non_utf8}:2: not UTF-8 text (byte 0xe9 at column 29)"),
    ("empty input", lambda p, f: sample(p, f["problems_empty"], f["out"]), 2,
     "0 records in {problems_empty}; expected at least one (pass --allow-empty to accept an empty input)"),
    ("prompt over the context", lambda p, f: sample(p, f["problems_long"], f["out"]), 2,
     "the prompt of record 'p0' is * tokens; with --max-new-tokens 8 it exceeds the policy's context of 96 tokens (shorten or drop it, or lower --max-new-tokens)"),
    ("mesh spec", lambda p, f: sample(p, f["problems"], f["out"], "--mesh", "data=3"), 2,
     "mesh spec 'data=3' uses 3 devices, but 8 are present"),
    ("rollout record", lambda p, f: ["rollout", "--policy", p, "--solutions", f["solutions_bad_steps"],
                                     "--out", f["out"]], 2,
     "{solutions_bad_steps}:1: key 'steps' should be a list of strings"),
    ("judge without endpoint", lambda p, f: ["judge", "--api", "openai", "--model", "m", "--solutions",
                                             f["solutions"], "--out", f["out"]], 2,
     "--api openai needs --endpoint URL"),
    ("judge template", lambda p, f: ["judge", "--api", "openai", "--endpoint", "http://127.0.0.1:9", "--model", "m",
                                     "--template", "nosuch", "--solutions", f["solutions"], "--out", f["out"]], 2,
     "judge template 'nosuch': no such file and no shipped template of that name"),
    ("judge empty", lambda p, f: ["judge", "--api", "openai", "--endpoint", "http://127.0.0.1:9", "--model", "m",
                                  "--solutions", f["problems_empty"], "--out", f["out"]], 2,
     "0 records in {problems_empty}; expected at least one (pass --allow-empty to accept an empty input)"),
    ("filter bad JSON", lambda p, f: ["filter", "--mc", f["mc_bad_json"], "--judge", f["mc_bad_json"], "--out",
                                      f["out"], "--report", f["out"] + ".json"], 2,
     "{mc_bad_json}:1: missing key 'mc'"),
    ("convert empty", lambda p, f: ["convert", "--from", "records", "--to", "trl", f["problems_empty"], f["out"]], 2,
     "0 records in {problems_empty}; expected at least one (pass --allow-empty to accept an empty input)"),
    ("convert onto a folder", lambda p, f: ["convert", "--from", "records", "--to", "records", f["solutions"],
                                            f["tmp"]],
     2, "*: Is a directory"),
    ("demo --set", lambda p, f: ["demo", "--out", f["tmp"] + "/demo", "--set", "nonsense=1"], 2,
     "--set nonsense: unknown key; expected one of *"),
]


@pytest.mark.parametrize("name,argv,status,message", CASES, ids=[c[0] for c in CASES])
def test_one_line_errors(name, argv, status, message, policy_dir, files, capsys):
    import fnmatch

    assert main(argv(policy_dir, files)) == status
    err = capsys.readouterr().err.splitlines()
    command = argv(policy_dir, files)[0]
    errors = [line for line in err if line.startswith(f"prm-jax {command}: error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    assert fnmatch.fnmatchcase(errors[0], f"prm-jax {command}: error: " + message.format(**files)), errors[0]
    assert not os.path.exists(files["out"])  # refused before any output was made


# Flags whose values are refused by argparse before anything runs (exit 2, its usage line and one error line).
FLAG_CASES = [
    (lambda p, f: sample(p, f["problems"], f["out"], "--max-new-tokens", "-1"),
     "argument --max-new-tokens: expected >= 1, got -1"),
    (lambda p, f: sample(p, f["problems"], f["out"], "--top-p", "1.5"), "argument --top-p: expected in (0, 1], got 1.5"),
    (lambda p, f: sample(f["tmp"] + "/nope", f["problems"], f["out"]),
     "argument --policy: {tmp}/nope: no such directory (expected a local model directory with config.json)"),
    (lambda p, f: sample(p, f["missing"], f["out"]), "argument --problems: {missing}: no such file"),
    (lambda p, f: ["rollout", "--policy", p, "--solutions", f["solutions"], "--out", f["out"], "--n", "0"],
     "argument --n: expected >= 1, got 0"),
    (lambda p, f: ["judge", "--api", "openai", "--solutions", f["solutions"], "--out", f["out"],
                   "--max-new-tokens", "-1"], "argument --max-new-tokens: expected >= 1, got -1"),
    (lambda p, f: ["toy", "solutions", "--problems", f["problems"], "--out", f["out"], "--error-rate", "2"],
     "argument --error-rate: expected in [0, 1], got 2"),
    (lambda p, f: ["eval", "bon", "--prm", f["tmp"], "--responses", f["solutions"], "--out", f["out"]],
     "argument --prm: {tmp}: not a model directory (no config.json)"),
]


@pytest.mark.parametrize("argv,message", FLAG_CASES)
def test_bad_flag_values_are_refused_before_work(argv, message, policy_dir, files, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv(policy_dir, files))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].endswith(message.format(**files)), err
    assert not os.path.exists(files["out"])


def test_empty_input_is_accepted_when_allowed(files, capsys):
    argv = ["convert", "--from", "records", "--to", "trl", "--allow-empty", files["problems_empty"], files["out"]]
    assert main(argv) == 0
    assert open(files["out"]).read() == ""


def test_debug_shows_the_traceback_and_the_console_script_exits_with_the_status(files):
    argv = ["convert", "--from", "records", "--to", "trl", files["problems_empty"], files["out"]]
    env = {**os.environ, "PRM_JAX_HUGEPAGES": "0"}
    cmd = [sys.executable, "-m", "prm_jax.cli"]
    proc = subprocess.run(cmd + argv, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and proc.stderr.startswith("prm-jax convert: error: 0 records in ")
    assert proc.stderr.count("\n") == 1
    proc = subprocess.run(cmd + ["--debug"] + argv, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("prm-jax convert: error: 0 records in ")
