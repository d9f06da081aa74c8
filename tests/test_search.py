"""PRM-guided search (prm_jax.search) on a tiny random policy whose logits are biased towards a
handful of tokens (digits, "+", " =", the newline, EOS), so it writes short multi-step solutions.

Independent references: the beam search is recomputed by a plain level-by-level enumeration with
`sampler.generate` (no prefix sharing, stops found by cutting the unstopped text) and a PRM scripted
here; aggregation and the answer rules are checked against hand-computed values; the stop-string
matcher against hand-made tables and an uncut generation."""
import json
import os
import signal
import subprocess
import sys
import time
import zlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prm_jax.grading import Grader
from prm_jax.data.steps import policy_prompt_ids, split_steps
from prm_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from prm_jax.sampling import sampler
from prm_jax.search import answers, policy as search_policy
from prm_jax.search.run import search

MAX_TOKENS = 12
WORDS = ["1", "2", "7", "+", "Ġ="]
PROBLEMS = [{"id": f"p{i}", "problem": f"What is {i} + 4?", "answer": str(i + 4)} for i in range(3)]


class BiasedLM(Qwen2ForCausalLM):
    """The tiny random LM plus a fixed logit bias (an nnx.Variable, so it travels through jit)."""

    def __init__(self, cfg, rngs, bias):
        super().__init__(cfg, rngs)
        self.bias = nnx.Variable(jnp.asarray(bias, jnp.float32))

    def logits(self, hidden):
        return super().logits(hidden) + self.bias[...]


def make_policy(tokenizer):
    vocab = len(tokenizer)
    bias = np.full(vocab, -30.0)
    bias[[tokenizer.convert_tokens_to_ids(w) for w in WORDS]] = 0.0
    bias[tokenizer.convert_tokens_to_ids("Ċ")] = 0.8  # "\n": "\n\n" (two tokens) ends a step
    bias[tokenizer.eos_token_id] = -2.5
    return BiasedLM(Qwen2Config.preset("tiny", vocab_size=vocab), nnx.Rngs(0), bias)


class ScriptedPRM:
    """Rewards steps that contain "7"; a small per-text term (crc32) keeps scores apart."""

    def score(self, items):
        return [[self.step(s) for s in steps] for _, steps in items]

    @staticmethod
    def step(text):
        return (0.8 if "7" in text else 0.2) + 1e-4 * (zlib.crc32(text.encode()) % 1000) / 1000


@pytest.fixture(scope="module")
def policy(toy_tokenizer):
    return make_policy(toy_tokenizer)


# -- pure parts --------------------------------------------------------------------------------------

def test_aggregation_by_hand():
    s = [0.9, 0.5, 0.8]
    assert answers.aggregate(s, "last") == 0.8
    assert answers.aggregate(s, "min") == 0.5
    assert answers.aggregate(s, "prod") == pytest.approx(0.9 * 0.5 * 0.8)
    assert answers.aggregate([], "min") is None
    with pytest.raises(ValueError, match="expected one of last, min, prod"):
        answers.aggregate(s, "mean")


def test_answer_rules_by_hand():
    grade = Grader(workers=0).grade_many
    finals = ["1/2", "0.5", "3", None, "3", "\\frac{1}{2}"]
    scores = [0.2, 0.3, 0.4, 0.9, 0.35, None]
    correct = [True, True, False, False, False, True]
    # classes: {1/2, 0.5, \frac12} (the grader calls them equal), {3}; None votes for nothing
    assert answers.answer_classes(finals, grade) == [0, 0, 1, None, 1, 0]
    got = answers.pick_answers(finals, scores, correct, grade)
    # weighted: 1/2 -> 0.2 + 0.3 + 0 = 0.5, 3 -> 0.4 + 0.35 = 0.75: "3" (first at index 2), wrong
    assert got["weighted"] == {"index": 2, "answer": "3", "correct": False}
    # majority: 1/2 has 3 votes, 3 has 2
    assert got["majority"] == {"index": 0, "answer": "1/2", "correct": True}
    # PRM-argmax: the 0.9 candidate, which has no answer
    assert got["prm_argmax"] == {"index": 3, "answer": None, "correct": False}
    assert got["pass"] is True
    tie = answers.pick_answers(["4", "5"], [0.5, 0.5], [False, True], grade)
    assert tie["weighted"]["index"] == 0 and tie["majority"]["index"] == 0  # ties: the class seen first
    none = answers.pick_answers([None], [0.3], [False], grade)
    assert none["weighted"] == {"index": -1, "answer": None, "correct": False}


def test_stop_string_table_by_hand():
    table = sampler.stop_string_table(["a", "\n", "\n\n", "x\n", "\nx", "\n\nz"], "\n\n")
    # row k: state after the token when the text so far ends with k newlines (of the 2 needed)
    assert table.tolist() == [[0, 1, 2, 1, 0, 2],
                              [0, 2, 2, 1, 2, 2]]
    t = sampler.stop_string_table(["ab", "a", "b", "c"], "aab")  # KMP fallback: "aa" + "ab" -> "aab"
    assert t[2].tolist() == [3, 2, 3, 0] and t[1].tolist() == [3, 2, 0, 0] and t[0].tolist() == [0, 1, 0, 0]


def test_a_step_that_states_the_final_answer_finishes_its_candidate(policy, toy_tokenizer):
    def finish(text, **cfg):
        stepper = search_policy.Stepper(policy, toy_tokenizer, search_policy.StepConfig(context=256, **cfg))
        return stepper._finish(toy_tokenizer.encode(text, add_special_tokens=False), 10, False)

    answered = "He buys 5 more marbles: 2 + 5 = 7. The answer is \\boxed{7}.\n\n"
    assert finish(answered) == "answer"  # the delimiter after an answer does not reopen the solution
    assert finish("He buys 5 more marbles: 2 + 5 = 7\n\n") is None  # an ordinary step goes on
    assert finish(answered, stop_at_answer=False) is None


def test_stop_string_and_uneven_counts_match_an_uncut_generation(policy, toy_tokenizer):
    """Rows stopped by the delimiter equal the same rows generated without it, cut where their text first
    holds it; a per-prefix count list gives the rows the uniform call gives."""
    tok = toy_tokenizer
    table = search_policy.delimiter_table(tok, "\n\n", policy.cfg.vocab_size)
    prefixes = [policy_prompt_ids(tok, p["problem"]) for p in PROBLEMS[:2]]
    eos = [tok.eos_token_id]
    kw = dict(temperature=1.0, seed=3, stop_ids=eos, key_ids=[11, 12])
    cut = sampler.generate_from_prefixes(policy, prefixes, [3, 1], MAX_TOKENS, stop_table=table, **kw)
    full = sampler.generate_from_prefixes(policy, prefixes, 3, MAX_TOKENS, **kw)
    assert [len(c) for c in cut] == [3, 1]
    stopped = 0
    for rows_cut, rows_full in zip(cut, full):
        for c, f in zip(rows_cut, rows_full):
            end = next((i + 1 for i in range(len(f)) if "\n\n" in tok.decode(f[:i + 1])), len(f))
            assert c == f[:end]
            stopped += end < len(f)
    assert stopped >= 1  # the delimiter did cut some row


# -- beam search against a brute-force enumeration ----------------------------------------------------

def _cut(tok, ids, to_end):
    """(segment, finish) of an uncut generation, by the rules of search: EOS, else the delimiter, else length."""
    for i in range(len(ids)):
        if ids[i] == tok.eos_token_id:
            return ids[:i + 1], "eos"
        if not to_end and "\n\n" in tok.decode(ids[:i + 1], skip_special_tokens=True):
            return ids[:i + 1], None
    return ids, "length"


def brute_force_beam(model, tok, prob, n, m, steps, agg):
    prompt = policy_prompt_ids(tok, prob["problem"])
    kept, finished = [((), ())], []
    for it in range(steps):
        to_end = it == steps - 1
        rows, prompts, keys, sids = [], [], [], []
        for b, (toks, path) in enumerate(kept):
            for j in range(n // len(kept) + (b < n % len(kept))):
                rows.append((toks, path + (j,)))
                prompts.append(prompt + list(toks))
                keys.append(search_policy.node_key(prob["id"], path))
                sids.append(j)
        outs = sampler.generate(model, prompts, MAX_TOKENS, temperature=1.0, seed=0, stop_ids=[tok.eos_token_id],
                                key_ids=keys, sample_ids=sids)
        scored = []
        for (toks, path), out in zip(rows, outs):
            seg, fin = _cut(tok, out, to_end)
            text = tok.decode(list(toks) + seg, skip_special_tokens=True)
            s = [ScriptedPRM.step(x) for x in split_steps(text)]
            scored.append({"path": path, "tokens": tuple(toks) + tuple(seg), "finish": fin,
                           "score": answers.aggregate(s, agg), "text": text})
        key = lambda c: (c["score"] is None, -(c["score"] or 0), c["path"])  # noqa: E731
        finished += [c for c in scored if c["finish"]]
        best_open = sorted((c for c in scored if not c["finish"]), key=key)[:n // m]
        kept = sorted(((c["tokens"], c["path"]) for c in best_open), key=lambda t: t[1])
        if len(finished) >= n or not kept:
            break
    return sorted(finished, key=key)[:n]


@pytest.mark.parametrize("agg", ["last", "min"])
def test_beam_search_selects_what_brute_force_enumeration_says(policy, toy_tokenizer, agg):
    n, m, steps = 4, 2, 4
    recs = search(policy, ScriptedPRM(), PROBLEMS, tokenizer=toy_tokenizer, strategy="beam", n=n, beam_width=m,
                  agg=agg, max_steps=steps, max_tokens=MAX_TOKENS, temperature=1.0, grade_workers=0)
    depth = 0
    for prob, rec in zip(PROBLEMS, recs):
        want = brute_force_beam(policy, toy_tokenizer, prob, n, m, steps, agg)
        got = rec["candidates"]
        assert [tuple(c["path"]) for c in got] == [c["path"] for c in want]
        assert [c["text"] for c in got] == [c["text"] for c in want]
        assert [c["finish"] for c in got] == [c["finish"] for c in want]
        assert [c["score"] for c in got] == pytest.approx([c["score"] for c in want])
        depth = max(depth, max(len(c["path"]) for c in got))
    assert depth >= 3  # beams survived several selections: the test is not trivial


def brute_force_dvts(model, tok, prob, n, m, steps, agg):
    """Each of the N/M subtrees on its own: expand the current node M ways, keep every finished
    child, move to the best child (score, then path) while it is unfinished."""
    prompt = policy_prompt_ids(tok, prob["problem"])
    finished, unfinished_seen = [], 0
    for s in range(n // m):
        toks, path = (), (s,)
        for it in range(steps):
            outs = sampler.generate(model, [prompt + list(toks)] * m, MAX_TOKENS, temperature=1.0, seed=0,
                                    stop_ids=[tok.eos_token_id], key_ids=[search_policy.node_key(prob["id"], path)] * m,
                                    sample_ids=range(m))
            kids = []
            for j, out in enumerate(outs):
                seg, fin = _cut(tok, out, it == steps - 1)
                text = tok.decode(list(toks) + seg, skip_special_tokens=True)
                score = answers.aggregate([ScriptedPRM.step(x) for x in split_steps(text)], agg)
                kids.append({"path": path + (j,), "tokens": tuple(toks) + tuple(seg), "finish": fin, "score": score,
                             "text": text})
            finished += [c for c in kids if c["finish"]]
            unfinished_seen += sum(not c["finish"] for c in kids)
            best = min(kids, key=lambda c: (c["score"] is None, -(c["score"] or 0), c["path"]))
            if best["finish"]:
                break
            toks, path = best["tokens"], best["path"]
    key = lambda c: (c["score"] is None, -(c["score"] or 0), c["path"])  # noqa: E731
    return sorted(finished, key=key)[:n], unfinished_seen


def test_dvts_selects_what_brute_force_enumeration_says_and_returns_finished_candidates_only(policy, toy_tokenizer):
    n, m, steps = 4, 2, 3
    recs = search(policy, ScriptedPRM(), PROBLEMS, tokenizer=toy_tokenizer, strategy="dvts", n=n, beam_width=m,
                  max_steps=steps, max_tokens=MAX_TOKENS, temperature=1.0, grade_workers=0)
    unfinished = 0
    for prob, rec in zip(PROBLEMS, recs):
        want, seen = brute_force_dvts(policy, toy_tokenizer, prob, n, m, steps, "last")
        got = rec["candidates"]
        unfinished += seen
        assert [tuple(c["path"]) for c in got] == [c["path"] for c in want]
        assert [c["text"] for c in got] == [c["text"] for c in want]
        assert [c["score"] for c in got] == pytest.approx([c["score"] for c in want])
        assert 1 <= len(got) <= n and all(c["finish"] in ("eos", "length") for c in got)
        assert {c["path"][0] for c in got} <= set(range(n // m))  # N/M subtrees
    assert max(len(c["path"]) for rec in recs for c in rec["candidates"]) >= 3  # subtrees went deep
    # search-and-learn's DVTS would have returned some of these unfinished children (its issue #57)
    assert unfinished >= 1


def test_policy_token_budget_equals_what_the_sampler_returned(policy, toy_tokenizer, monkeypatch):
    returned = []
    real = search_policy.generate_from_prefixes

    def counting(*a, **kw):
        out = real(*a, **kw)
        returned.append(sum(len(ids) for rows in (out[0] if kw.get("return_cache") else out) for ids in rows))
        return out

    monkeypatch.setattr(search_policy, "generate_from_prefixes", counting)
    kw = dict(tokenizer=toy_tokenizer, strategy="beam", n=4, beam_width=2, max_steps=3, lookahead=1,
              max_tokens=MAX_TOKENS, temperature=1.0, grade_workers=0)
    prefilled = sampler.total_stats().prefill_tokens
    recs = search(policy, ScriptedPRM(), PROBLEMS, **kw)
    assert sum(r["budget"]["policy_tokens"] for r in recs) == sum(returned) > 0
    reused = sampler.total_stats().prefill_tokens - prefilled
    assert sum(r["budget"]["prefill_tokens"] for r in recs) == reused
    # without the kept KV caches: the same candidates, every prefix prefilled whole at every step
    prefilled = sampler.total_stats().prefill_tokens
    whole = search(policy, ScriptedPRM(), PROBLEMS, reuse_kv=False, **kw)
    full = sampler.total_stats().prefill_tokens - prefilled
    assert sum(r["budget"]["prefill_tokens"] for r in whole) == full
    for prob, a, b in zip(PROBLEMS, recs, whole):
        assert {**a, "budget": None} == {**b, "budget": None}
        assert a["budget"]["policy_tokens"] == b["budget"]["policy_tokens"]
        # with reuse: the prompt once, then one token per request (at most n per expansion or
        # lookahead call, two calls per iteration), instead of its whole prefix
        prompt, iters = len(policy_prompt_ids(toy_tokenizer, prob["problem"])), a["budget"]["iterations"]
        assert prompt < a["budget"]["prefill_tokens"] <= prompt + 2 * iters * 4
        assert b["budget"]["prefill_tokens"] > 5 * a["budget"]["prefill_tokens"]


# -- resume after kill -9, and the CLI ----------------------------------------------------------------

MANY = [{"id": f"q{i}", "problem": f"What is {i} + 7?", "answer": str(i + 7)} for i in range(8)]
RUN = dict(strategy="beam", n=4, beam_width=2, max_steps=3, max_tokens=MAX_TOKENS, temperature=1.0,
           grade_workers=0, batch_size=1, plots=False)
CHILD = """
import sys
sys.path.insert(0, {tests!r})
from transformers import AutoTokenizer
from test_search import MANY, RUN, ScriptedPRM, make_policy
from prm_jax.search.run import search
tok = AutoTokenizer.from_pretrained({tok!r})
search(make_policy(tok), ScriptedPRM(), MANY, tokenizer=tok, out={out!r}, **RUN)
"""


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(x) for x in f.read().splitlines()]


def test_resume_after_kill_9_gives_the_uninterrupted_result(policy, toy_tokenizer, toy_tokenizer_dir, tmp_path):
    whole = tmp_path / "whole"
    search(policy, ScriptedPRM(), MANY, tokenizer=toy_tokenizer, out=whole, **RUN)
    out = tmp_path / "killed"
    code = CHILD.format(tests=os.path.dirname(__file__), tok=toy_tokenizer_dir, out=str(out))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
    records = out / "search.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and child.poll() is None:
        if records.exists() and records.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()[-2000:]
    written = records.read_bytes().count(b"\n")
    assert 2 <= written < len(MANY)  # killed mid-run
    with open(records, "ab") as f:  # and a torn last line, as a kill inside a write leaves
        f.write(b'{"key": "beam/n=4/m=2/agg=last/steps=3/lookahead=0/q7", "cand')
    resumed = search(policy, ScriptedPRM(), MANY, tokenizer=toy_tokenizer, out=out, **RUN)
    got, want = _lines(records), _lines(whole / "search.jsonl")
    assert len(got) == len(MANY) == len({r["key"] for r in got})  # no duplicate, no torn line
    assert sorted(got, key=lambda r: r["key"]) == sorted(want, key=lambda r: r["key"])
    assert resumed == sorted(want, key=lambda r: [p["id"] for p in MANY].index(r["id"]))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, toy_tokenizer, toy_tokenizer_dir):
    from prm_jax.models.hf import save_hf
    from prm_jax.models.prm import Qwen2PRM

    root = tmp_path_factory.mktemp("search_models")
    cfg = Qwen2Config.preset("tiny", vocab_size=len(toy_tokenizer))
    save_hf(Qwen2ForCausalLM(cfg, nnx.Rngs(1)), root / "policy", tokenizer_dir=toy_tokenizer_dir)
    save_hf(Qwen2PRM(cfg, nnx.Rngs(2)), root / "prm", tokenizer_dir=toy_tokenizer_dir)
    problems = root / "problems.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return str(root / "policy"), str(root / "prm"), str(problems)


def test_cli_search_writes_records_summary_plot_and_counts_prm_tokens(model_dirs, toy_tokenizer, tmp_path, capsys):
    from prm_jax import cli
    from prm_jax.data.prm_format import encode_prm

    pol, prm, problems = model_dirs
    out = tmp_path / "out"
    base = ["search", "--policy", pol, "--prm", prm, "--problems", problems, "--out", str(out), "--n", "4",
            "--max-tokens", str(MAX_TOKENS), "--grade-workers", "0", "--no-progress"]
    assert cli.main(base + ["--strategy", "best-of-n"]) == 0
    assert cli.main(base + ["--strategy", "beam", "--beam-width", "2", "--max-steps", "2"]) == 0
    recs = _lines(out / "search.jsonl")
    assert sorted({r["strategy"] for r in recs}) == ["beam", "best-of-n"] and len(recs) == 2 * len(PROBLEMS)
    summary = json.loads((out / "search_summary.json").read_text())
    assert len(summary) == 2 and (out / "search_accuracy.png").stat().st_size > 0
    step_id = toy_tokenizer.convert_tokens_to_ids("<extra_0>")
    for r in recs:
        if r["strategy"] == "best-of-n":  # each candidate scored once, on all its steps
            want = sum(len(encode_prm(toy_tokenizer, r["problem"], c["steps"], step_id)) for c in r["candidates"]
                       if c["steps"])
            assert r["budget"]["prm_tokens"] == want
        assert len(r["candidates"]) == 4 and all(len(c["step_scores"]) == len(c["steps"]) for c in r["candidates"])
    capsys.readouterr()
    assert cli.main(base + ["--strategy", "beam", "--beam-width", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "beam width 3 must divide n=4" in err
