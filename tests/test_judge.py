"""The LLM judge: verdict parser (table of realistic replies), templates, voting, and the clients
end to end against a real loopback HTTP server (tests/judge_fixture.py) that injects faults."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prm_jax import cli
from prm_jax.labeling.consensus import consensus_filter, load_labelled
from prm_jax.labeling.judge import (JudgeTemplate, judge_solutions, load_template, majority_vote, parse_template,
                                    parse_verdict)
from prm_jax.labeling.judge_clients import (OpenAIClient, RetryPolicy, SamplingParams, SGLangClient,
                                            parse_retry_after)
from prm_jax.labeling.solutions import Solution, read_solutions
from prm_jax.records import RecordError

sys.path.insert(0, str(Path(__file__).parent))
from judge_fixture import GARBAGE_REPLY, JudgeFixture, conclusion_reply  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FAST = RetryPolicy(max_retries=3, base_delay=0.01, max_delay=0.05)

# --------------------------------------------------------------------------- parser

CRITIQUE_OK = """<analysis_1>
The paragraph computes 3 + 12 = 15, which is right.
</analysis_1>

<analysis_2>
15 * 4 = 60 is correct. Note the solution ends with \\boxed{53}, which we check next.
</analysis_2>

<analysis_3>
60 - 7 = 53, correct, so the final \\boxed{53} is consistent.
</analysis_3>

<analysis_4>
The answer statement restates 53. Correct.
</analysis_4>

<conclusion>Correct</conclusion>"""

CRITIQUE_BAD_2 = """<analysis_1>
Tom starts with 3 apples and buys 12 more: 3 + 12 = 15. This paragraph is correct.
</analysis_1>

<analysis_2>
The paragraph claims 15 * 4 = 64, but 15 * 4 = 60. This paragraph is incorrect.
</analysis_2>

<conclusion>Incorrect</conclusion>"""

# (reply, n_steps, index_base, style) -> expected 0-based first error (-1 none, None unreadable)
PARSER_TABLE = [
    ("conclusion: all correct despite quoted boxed answers", CRITIQUE_OK, 4, 1, "conclusion", -1),
    ("conclusion: stops at paragraph 2 (1-based)", CRITIQUE_BAD_2, 4, 1, "conclusion", 1),
    ("conclusion: 0-based analysis tags", CRITIQUE_BAD_2.replace("_1>", "_0>").replace("_2>", "_1>"), 4, 0,
     "conclusion", 1),
    ("conclusion: bold and lower case", "<analysis_1>ok</analysis_1>\n<analysis_2>x</analysis_2>\n"
     "<analysis_3>wrong sign</analysis_3>\n<conclusion>**incorrect**</conclusion>", 4, 1, "auto", 2),
    ("conclusion: paragraph tags are not analyses", "<paragraph_1> fine\n<paragraph_2> wrong\n"
     "<conclusion>Incorrect</conclusion>", 3, 1, "conclusion", None),
    ("conclusion: Incorrect without any analysed paragraph", "The solution is wrong.\n"
     "<conclusion>Incorrect</conclusion>", 4, 1, "conclusion", None),
    ("conclusion: analysed paragraph beyond the solution", "<analysis_5>bad</analysis_5>"
     "<conclusion>Incorrect</conclusion>", 4, 1, "conclusion", None),
    ("conclusion: neither word", "<analysis_1>meh</analysis_1><conclusion>Partially correct</conclusion>",
     4, 1, "conclusion", None),
    ("conclusion: cut off before the verdict", "<analysis_1>\nFine.\n</analysis_1>\n<analysis_2>\nThe comp",
     4, 1, "conclusion", None),
    ("conclusion: draft inside <think> is ignored",
     "<think>maybe <conclusion>Correct</conclusion>? let me recheck</think>\n" + CRITIQUE_BAD_2, 4, 1, "auto", 1),
    ("boxed: earliest error 2 (0-based)", "Paragraph 0 is fine. Paragraph 1 is fine. Paragraph 2 divides by "
     "zero.\n\nThe earliest error is in paragraph 2.\n\n\\boxed{2}", 5, 0, "boxed", 2),
    ("boxed: none", "All paragraphs check out.\n\n\\boxed{-1}", 5, 0, "boxed", -1),
    ("boxed: spaces and math mode", "So the answer is $\\boxed{ 3 }$.", 5, 0, "boxed", 3),
    ("boxed: text-wrapped minus one", "\\boxed{\\text{-1}}", 5, 0, "boxed", -1),
    ("boxed: last box wins over a quoted answer", "Paragraph 1 concludes \\boxed{7}, but paragraph 1 is wrong."
     "\n\nFinal: \\boxed{1}", 5, 0, "boxed", 1),
    ("boxed: index past the last paragraph", "\\boxed{5}", 5, 0, "boxed", None),
    ("boxed: 1-based index", "\\boxed{1}", 5, 1, "boxed", 0),
    ("boxed: 0 under 1-based numbering is no paragraph", "\\boxed{0}", 5, 1, "boxed", None),
    ("boxed: not a number", "\\boxed{paragraph 2}", 5, 0, "boxed", None),
    ("boxed: unclosed", "The earliest error is \\boxed{2", 5, 0, "boxed", None),
    ("boxed template, conclusion-style reply", CRITIQUE_BAD_2.replace("_1>", "_0>").replace("_2>", "_1>"),
     4, 0, "boxed", 1),
    ("auto: boxed-only reply", "Error found.\n\\boxed{0}", 3, 0, "auto", 0),
    ("garbage", GARBAGE_REPLY, 4, 1, "auto", None),
    ("empty", "", 4, 1, "auto", None),
]


@pytest.mark.parametrize("name,reply,n,base,style,expected", PARSER_TABLE, ids=[r[0] for r in PARSER_TABLE])
def test_parse_verdict(name, reply, n, base, style, expected):
    assert parse_verdict(reply, n, base, style) == expected


def test_fixture_critique_matches_what_it_names():
    for base in (0, 1):
        for fe in (-1, 0, 2, 4):
            assert parse_verdict(conclusion_reply(fe, 5, base), 5, base) == fe


# Replies that checked nothing (issue 24, item 5), on a 4-step solution numbered from 1. Each row was
# misread before the parser's rules were tightened (old reading in the comment).
_OK = "The computation checks out, so this paragraph is correct."


def _analyses_ok(indices) -> str:
    return "\n".join(f"<analysis_{k}>\n{_OK}\n</analysis_{k}>" for k in indices)


_ANALYSES_OK = _analyses_ok(range(1, 5))
UNCHECKED = {
    # old: -1. A verdict with no analysis at all.
    "bare_correct": ("<conclusion>Correct</conclusion>", 4, None),
    # old: -1. Only paragraph 1 was analysed; "Correct" speaks for paragraphs 2-4 unchecked.
    "first_only_then_correct": (f"<analysis_1>\n{_OK}\n</analysis_1>\n\n<conclusion>Correct</conclusion>", 4, None),
    # old: -1. The one analysis calls its paragraph incorrect, the conclusion says Correct.
    "incorrect_then_correct": ("<analysis_1>\n3 + 12 = 16 is incorrect.\n</analysis_1>\n"
                               "<conclusion>Correct</conclusion>", 1, None),
    # old: -1. Every paragraph analysed, the first called incorrect, still "Correct".
    "all_analysed_first_incorrect_then_correct": (
        _ANALYSES_OK.replace(_OK, "The sum is wrong, so this paragraph is incorrect.", 1)
        + "\n<conclusion>Correct</conclusion>", 4, None),
    # old: -1. Cut off while thinking; the "Correct" is a draft inside the open <think>.
    "unclosed_think_drafts_correct": ("<think>\nLet me draft the critique.\n" + _ANALYSES_OK
                                      + "\n<conclusion>Correct</conclusion>\nHmm, but paragraph 3 divides", 4, None),
    # old: 2 (the quoted \boxed{3} read as paragraph 3). Cut off before its conclusion.
    "cut_off_quoting_boxed_answer": ("<analysis_1>\nThis paragraph is correct.\n</analysis_1>\n<analysis_2>\n"
                                     "The solution's final answer \\boxed{3} rests on this product, but 15 * 4", 4, None),
    # old: 2 (the quoted <paragraph_3> read as the last analysed paragraph). The error is paragraph 2.
    "error_analysis_mentions_later_paragraph": (
        f"<analysis_1>\n{_OK}\n</analysis_1>\n<analysis_2>\nThe paragraph claims 15 * 4 = 64, which is incorrect; "
        "<paragraph_3> builds on it.\n</analysis_2>\n<conclusion>Incorrect</conclusion>", 4, 1),
}


@pytest.mark.parametrize("style", ["conclusion", "auto"])
@pytest.mark.parametrize("name", list(UNCHECKED))
def test_replies_that_checked_nothing(name, style):
    reply, n, expected = UNCHECKED[name]
    assert parse_verdict(reply, n, 1, style) == expected


# The rules' positive and edge cases: (reply, n_steps, index_base, style, expected).
RULES_TABLE = [
    ("full correct analysis", _ANALYSES_OK + "\n<conclusion>Correct</conclusion>", 4, 1, "conclusion", -1),
    ("full correct analysis, 0-based", _analyses_ok(range(4)) + "\n<conclusion>Correct</conclusion>",
     4, 0, "conclusion", -1),
    ("closed think is ignored", "<think>\n<conclusion>Incorrect</conclusion>\n</think>\n" + _ANALYSES_OK
     + "\n<conclusion>Correct</conclusion>", 4, 1, "conclusion", -1),
    ("analyses left open are read to the next tag", "<analysis_1> fine, correct\n<analysis_2> 15 * 4 = 64 is "
     "wrong\n<conclusion>Incorrect</conclusion>", 4, 1, "conclusion", 1),
    ("incorrect at 3 (1-based)", "<analysis_1>ok</analysis_1><analysis_2>ok</analysis_2><analysis_3>not correct"
     "</analysis_3><conclusion>Incorrect</conclusion>", 4, 1, "conclusion", 2),
    ("incorrect at 0 (0-based)", "<analysis_0>This isn't correct.</analysis_0><conclusion>Incorrect</conclusion>",
     4, 0, "conclusion", 0),
    ("incorrect after a skipped paragraph", "<analysis_1>ok</analysis_1><analysis_3>wrong</analysis_3>"
     "<conclusion>Incorrect</conclusion>", 4, 1, "conclusion", None),
    ("incorrect, an earlier analysis already said incorrect", "<analysis_1>incorrect</analysis_1>"
     "<analysis_2>incorrect too</analysis_2><conclusion>Incorrect</conclusion>", 4, 1, "conclusion", None),
    ("incorrect at an analysis revisited out of order", "<analysis_1>ok</analysis_1><analysis_2>ok</analysis_2>"
     "<analysis_1>on reflection, wrong</analysis_1><conclusion>Incorrect</conclusion>", 4, 1, "conclusion", None),
    ("bare analysis_ words are no tags", "analysis_1: fine. analysis_2: wrong.\n<conclusion>Incorrect</conclusion>",
     4, 1, "conclusion", None),
    ("correct with analyses past the last step", _ANALYSES_OK + "\n<analysis_5>ok</analysis_5>\n"
     "<conclusion>Correct</conclusion>", 4, 1, "conclusion", None),
    ("'incorrectly' is not the word 'incorrect'", _ANALYSES_OK.replace(_OK, "Not done incorrectly; "
     "correct.", 1) + "<conclusion>Correct</conclusion>", 4, 1, "conclusion", -1),
    ("boxed style keeps its boxed rule despite analyses", "<analysis_0>ok</analysis_0>\n\\boxed{2}", 4, 0,
     "boxed", 2),
    ("boxed style: unclosed think", "<think>paragraph 2 looks off \\boxed{2}", 4, 0, "boxed", None),
]


@pytest.mark.parametrize("name,reply,n,base,style,expected", RULES_TABLE, ids=[r[0] for r in RULES_TABLE])
def test_conclusion_rules(name, reply, n, base, style, expected):
    assert parse_verdict(reply, n, base, style) == expected


@pytest.mark.parametrize("votes,expected", [
    ([2], 2), ([None], None), ([2, 2, 1], 2), ([1, 2, None, 2], 2), ([2, 2, 1, None], 2),
    ([None, None], None), ([1, 2], None), ([-1, -1, 3, 3], None), ([1, 2, 3], None), ([], None),
    # a lone or half-share readable reply among unreadable ones does not decide
    ([None, None, -1], None), ([-1, None], None), ([2, 2, None, None], None), ([-1, None, None, None, -1], None),
])
def test_majority_vote(votes, expected):
    assert majority_vote(votes) == expected


# --------------------------------------------------------------------------- templates

def test_shipped_templates_render_steps_with_their_numbering():
    problem = "Compute $\\frac{1}{2} + {x}$ where {steps} is literal text."
    steps = ["Step with {braces} and \\boxed{1}.", "Second."]
    t1 = load_template("default")
    assert t1.index_base == 1 and t1.verdict == "conclusion" and t1.system
    user = t1.messages(problem, steps)[-1]["content"]
    assert "<paragraph_1>\nStep with {braces} and \\boxed{1}.\n</paragraph_1>\n\n<paragraph_2>\nSecond.\n</paragraph_2>" in user
    assert problem in user  # inserted values are not re-scanned for placeholders
    t0 = load_template("boxed")
    msgs = t0.messages(problem, steps)
    assert t0.index_base == 0 and t0.verdict == "boxed" and [m["role"] for m in msgs] == ["user"]
    assert "<paragraph_0>\nStep with" in msgs[0]["content"] and "<paragraph_1>\nSecond." in msgs[0]["content"]


def test_custom_template_file(tmp_path):
    p = tmp_path / "mine.txt"
    p.write_text("---\nindex_base: 0\nverdict: boxed\nparagraph: '[{index}] {text}'\njoiner: ' | '\n---\n"
                 "Q: {problem}\nS: {steps}\n")
    t = load_template(p)
    assert t.messages("1+1?", ["a", "b"]) == [{"role": "user", "content": "Q: 1+1?\nS: [0] a | [1] b"}]
    with pytest.raises(ValueError, match="unknown front-matter keys"):
        parse_template("---\nbase: 1\n---\n{problem} {steps}")
    with pytest.raises(ValueError, match=r"lacks the \{steps\}"):
        parse_template("{problem}")
    with pytest.raises(ValueError, match="verdict must be one of"):
        JudgeTemplate(body="{problem}{steps}", verdict="stars")
    with pytest.raises(FileNotFoundError):
        load_template("no-such-template")


def test_bad_solution_lines_name_file_and_line(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"id": 1, "problem": "p", "steps": ["a"]}\n{"id": 2, "problem": "p", "steps": ["b", 3]}\n')
    with pytest.raises(RecordError, match=r"s\.jsonl:2: key 'steps' should be a list of strings"):
        read_solutions(str(p))
    p.write_text('{"id": 1, "problem": "p", "steps": ["a"]}\n{"id": 1, "problem": "p", "steps": ["b"]}\n')
    with pytest.raises(RecordError, match=r"s\.jsonl:2: duplicate id 1"):
        read_solutions(str(p))


# --------------------------------------------------------------------------- clients against the fixture

def make_solutions(n: int, n_steps: int = 4) -> tuple[list[Solution], dict[int, int]]:
    """Solutions whose problem tells the fixture which step to name; expected verdict by id."""
    truth = {i: (i % (n_steps + 1)) - 1 for i in range(n)}  # -1, 0, 1, ..., n_steps-1
    sols = [Solution({"id": i, "problem": f"<case-{i}> Problem {i}. [first_error={truth[i]}]",
                      "steps": [f"step {k} of solution {i}" for k in range(n_steps)], "extra": "kept"}, f"mem:{i}")
            for i in range(n)]
    return sols, truth


def read_out(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def run(coro):
    return asyncio.run(coro)


async def judge_with(client, sols, out, **kw):
    async with client:
        return await judge_solutions(sols, client, out_path=str(out), template=load_template(kw.pop("template", "default")),
                                     model="judge-m", progress=False, **kw)


def test_openai_faults_every_record_judged_or_failed(tmp_path):
    sols, truth = make_solutions(20)
    plan = {"<case-1>": ["500", "500"], "<case-2>": ["429"], "<case-3>": ["truncated"], "<case-4>": ["disconnect"],
            "<case-5>": ["badshape"], "<case-6>": ["garbage"], "<case-7>": ["500"] * 4,
            "<case-8>": ["chunked"], "<case-9>": ["close"], "<case-10>": ["close"]}  # the last two are no faults
    out = tmp_path / "out.jsonl"
    with JudgeFixture(fault_plan=plan) as fx:
        client = OpenAIClient(fx.url, "judge-m", SamplingParams(), concurrency=4, retry=FAST)
        s = run(judge_with(client, sols, out))
        recs = read_out(out)
        ids = [r["id"] for r in recs]
        assert sorted(ids) == [i for i in range(20) if i != 7] and len(set(ids)) == len(ids)
        for r in recs:
            assert r["extra"] == "kept" and r["judge"]["model"] == "judge-m"
            if r["id"] == 6:
                assert r["judge"]["first_error"] is None and r["judge"]["raw"] == GARBAGE_REPLY
            else:
                assert r["judge"]["first_error"] == truth[r["id"]]
        failed = read_out(f"{out}.failed.jsonl")
        assert [f["id"] for f in failed] == [7] and "gave up after 4 attempts" in failed[0]["error"]
        # 2 + 1 + 1 + 1 + 1 retried faults, and record 7 retried 3 times before giving up. The pool may
        # also reuse a connection the server has just closed ("close" cases) and count that as a retry.
        stale = client.counters.errors.get("connection", 0) - 1
        assert 0 <= stale <= 2
        assert (s.judged, s.failed, s.unparsed) == (19, 1, 1)
        assert (client.counters.retries, client.counters.failures) == (9 + stale, 1)
        assert client.counters.errors == {"http_500": 6, "http_429": 1, "malformed": 2, "connection": 1 + stale}
        assert s.requests == 20 + 9 + stale and fx.counts["requests"] == 29

        # The fault is gone: a rerun asks only for the failed record and clears the failed list.
        client = OpenAIClient(fx.url, "judge-m", SamplingParams(), concurrency=4, retry=FAST)
        s2 = run(judge_with(client, sols, out))
        assert (s2.resumed, s2.judged, s2.requests) == (19, 1, 1)
        assert sorted(r["id"] for r in read_out(out)) == list(range(20))
        assert not os.path.exists(f"{out}.failed.jsonl")


def test_sglang_native_batched_with_chat_template(tmp_path, toy_tokenizer):
    sols, truth = make_solutions(10, n_steps=3)
    out = tmp_path / "out.jsonl"
    with JudgeFixture(fault_plan={"<case-5>": ["500"]}) as fx:
        client = SGLangClient(fx.url, "judge-m", SamplingParams(max_new_tokens=64), tokenizer=toy_tokenizer,
                              concurrency=2, retry=FAST)
        s = run(judge_with(client, sols, out, batch_size=4, template="boxed"))
        assert fx.counts["/health"] == 1 and fx.counts["/get_model_info"] == 1
        assert client.model_info["model_path"] == "fixture-judge"
        # 10 prompts in batches of 4, 4, 2; the batch holding case 5 was sent twice
        assert fx.counts["/generate"] == 4 and s.requests == 4 and s.retries == 1
        served = list(fx.prompts_served)
        assert all(t.startswith("<|im_start|>user\n") and t.endswith("<|im_start|>assistant\n") for t in served)
        assert all("<paragraph_0>" in t for t in served)
        recs = read_out(out)
        assert sorted(r["id"] for r in recs) == list(range(10))
        assert all(r["judge"]["first_error"] == truth[r["id"]] for r in recs)
        assert s.completion_tokens > 0 and s.prompt_tokens > 0


def test_timeout_and_retry_after(tmp_path):
    sols, truth = make_solutions(3)
    with JudgeFixture(fault_plan={"<case-0>": ["slow"], "<case-1>": ["429"]}, slow_s=1.0, retry_after="7") as fx:
        client = OpenAIClient(fx.url, "judge-m", SamplingParams(), concurrency=3, timeout=0.3, retry=FAST)
        delays = []

        async def fake_sleep(d):
            delays.append(d)

        client.sleep = fake_sleep
        run(judge_with(client, sols, tmp_path / "out.jsonl"))
        assert client.counters.errors == {"timeout": 1, "http_429": 1}
        assert sorted(delays)[-1] >= 7.0 and sorted(delays)[0] <= FAST.max_delay  # Retry-After honoured
        assert all(r["judge"]["first_error"] == truth[r["id"]] for r in read_out(tmp_path / "out.jsonl"))


def test_retry_after_and_backoff_values():
    import email.utils
    import random

    assert parse_retry_after("3") == 3.0 and parse_retry_after("0.5") == 0.5 and parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 100, usegmt=True)
    assert 95 <= parse_retry_after(later) <= 100
    pol, rng = RetryPolicy(base_delay=1.0, max_delay=5.0), random.Random(0)
    for attempt, cap in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 5.0), (9, 5.0)]:
        d = pol.delay(attempt, None, rng)
        assert cap / 2 <= d <= cap
    assert pol.delay(0, 42.0, rng) == 42.0


def test_rate_cap_spaces_request_starts(monkeypatch):
    from prm_jax.labeling import judge_clients as jc

    slept = []

    async def fake_sleep(d):
        slept.append(round(d, 9))

    monkeypatch.setattr(jc.time, "monotonic", lambda: 100.0)  # no time passes between requests
    monkeypatch.setattr(jc.asyncio, "sleep", fake_sleep)
    limiter = jc.RateLimiter(10.0)

    async def four():
        for _ in range(4):
            await limiter.wait()

    asyncio.run(four())
    assert slept == [0.1, 0.2, 0.3]  # the first request starts at once, the rest 1/rate apart


def test_samples_majority_vote_and_cache(tmp_path):
    """K=3 replies per solution; the fixture answers each prompt with 1, 1 and 3 in turn (any order)."""
    counter = {}

    def script(prompt):
        k = counter.get(prompt, 0)
        counter[prompt] = k + 1
        return conclusion_reply([1, 3, 1][k % 3], 4)

    sols, _ = make_solutions(4)
    out = tmp_path / "out.jsonl"
    with JudgeFixture(script=script) as fx:
        client = OpenAIClient(fx.url, "judge-m", SamplingParams(temperature=0.7), concurrency=4, retry=FAST)
        run(judge_with(client, sols, out, samples=3))
        assert fx.counts["requests"] == 12
        recs = read_out(out)
        for r in recs:
            assert r["judge"]["first_error"] == 1 and sorted(r["judge"]["votes"]) == [1, 1, 3]
            assert parse_verdict(r["judge"]["raw"], 4) == 1

        # Same cache, fresh output: every reply comes from the cache, no request is sent.
        out2 = tmp_path / "again.jsonl"
        client = OpenAIClient(fx.url, "judge-m", SamplingParams(temperature=0.7), concurrency=4, retry=FAST)
        s = run(judge_with(client, sols, out2, samples=3, cache_path=f"{out}.cache.jsonl"))
        assert s.requests == 0 and s.cache_hits == 12 and fx.counts["requests"] == 12
        assert sorted(map(json.dumps, read_out(out2))) == sorted(map(json.dumps, recs))
        # Other sampling parameters are another cache key.
        client = OpenAIClient(fx.url, "judge-m", SamplingParams(temperature=0.5), concurrency=4, retry=FAST)
        s = run(judge_with(client, sols, tmp_path / "t05.jsonl", samples=1, cache_path=f"{out}.cache.jsonl"))
        assert s.requests == 4 and s.cache_hits == 0


def test_unchecked_replies_end_to_end_are_null_and_dropped(tmp_path):
    """Replies that checked nothing, served by the loopback server through the OpenAI client, are
    written with judge.first_error null (one sample, and three samples where only one parsed), and
    consensus filtering drops them even where MC says "no error"."""
    replies = {0: UNCHECKED["bare_correct"][0], 1: UNCHECKED["unclosed_think_drafts_correct"][0],
               2: UNCHECKED["cut_off_quoting_boxed_answer"][0], 3: UNCHECKED["error_analysis_mentions_later_paragraph"][0],
               4: _ANALYSES_OK + "\n<conclusion>Correct</conclusion>"}
    expected = {0: None, 1: None, 2: None, 3: 1, 4: -1}
    sols = [Solution({"id": i, "problem": f"<case-{i}> Problem {i}.", "steps": [f"step {k}" for k in range(4)]},
                     f"mem:{i}") for i in replies]
    served: dict[str, int] = {}

    def script(prompt):
        i = int(prompt.split("<case-", 1)[1].split(">", 1)[0])
        k = served.get(prompt, 0)
        served[prompt] = k + 1
        # with several samples, case 4's later samples are unreadable: one "-1" among two nulls
        return replies[i] if i != 4 or k == 0 else GARBAGE_REPLY

    out, voted = tmp_path / "out.jsonl", tmp_path / "voted.jsonl"
    with JudgeFixture(script=script) as fx:
        s = run(judge_with(OpenAIClient(fx.url, "judge-m", SamplingParams(), concurrency=2, retry=FAST), sols, out))
        served.clear()
        run(judge_with(OpenAIClient(fx.url, "judge-m", SamplingParams(), concurrency=2, retry=FAST), sols[4:], voted,
                       samples=3))
    recs = {r["id"]: r for r in read_out(out)}
    assert {i: r["judge"]["first_error"] for i, r in recs.items()} == expected
    assert all(recs[i]["judge"]["raw"] == replies[i] for i in replies) and s.unparsed == 3
    [v] = read_out(voted)
    assert v["judge"]["first_error"] is None and sorted(v["judge"]["votes"], key=str) == [-1, None, None]

    # MC says "no error" everywhere: only the record the judge read as -1 agrees and is kept.
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({**sol.record, "mc": {"n": 4, "correct": [4] * 4, "first_error": -1}}) + "\n"
                          for sol in sols))
    kept, report = consensus_filter(load_labelled(str(mc), "mc"), load_labelled(str(out), "judge"))
    assert [r["id"] for r in kept] == [4] and report["dropped_unparsed"] == 3 and report["dropped_disagree"] == 1
    kept, report = consensus_filter(load_labelled(str(mc), "mc"), load_labelled(str(voted), "judge"))
    assert kept == [] and report["dropped_unparsed"] == 1

def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "prm_jax.cli", *map(str, args)]


def test_kill9_then_restart_completes_the_set(tmp_path):
    n = 60
    sols, truth = make_solutions(n)
    src = tmp_path / "solutions.jsonl"
    src.write_text("".join(json.dumps(s.record) + "\n" for s in sols))
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with JudgeFixture(latency_s=0.05, fault_rate=0.05, fault_kinds=("500", "truncated"), seed=1) as fx:
        cmd = _cli("judge", "--api", "openai", "--endpoint", fx.url, "--model", "judge-m", "--solutions", src,
                   "--out", out, "--concurrency", 2, "--no-progress")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 10:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the judge finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        before = len(out.read_text().splitlines())
        assert 10 <= before < n
        served_first = fx.counts["ok"]

        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert f"{before} already done" in done.stdout
        recs = read_out(out)
        ids = [r["id"] for r in recs]
        assert sorted(ids) == list(range(n)) and len(set(ids)) == n
        assert all(r["judge"]["first_error"] == truth[r["id"]] for r in recs)
        # At most the two replies in flight at the kill were asked for twice.
        assert fx.counts["ok"] <= n + 2 and fx.counts["ok"] - served_first <= n - before + 2

        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and "0 sent" in again.stdout and f"{n} already done" in again.stdout


def judge_cli(tmp_path, tokenizer_dir, capsys, records) -> tuple[int, str, list[dict]]:
    """`prm-jax judge --api sglang` on `records` against the fixture: (exit code, stdout, records out)."""
    src, out = tmp_path / "solutions.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    with JudgeFixture() as fx:
        rc = cli.main(["judge", "--api", "sglang", "--endpoint", fx.url, "--tokenizer", tokenizer_dir,
                            "--solutions", str(src), "--out", str(out), "--no-progress"])
    return rc, capsys.readouterr().out, read_out(out)


def test_cli_sglang_takes_model_name_from_server(tmp_path, toy_tokenizer_dir, capsys):
    sols, truth = make_solutions(3)
    rc, printed, recs = judge_cli(tmp_path, toy_tokenizer_dir, capsys, [s.record for s in sols])
    assert rc == 0 and "3 judged" in printed and "requests: 3 sent" in printed
    assert {r["judge"]["model"] for r in recs} == {"fixture-judge"}
    assert all(r["judge"]["first_error"] == truth[r["id"]] for r in recs)


def test_cli_leaves_out_solutions_with_no_steps(tmp_path, toy_tokenizer_dir, capsys):
    """A policy that wrote nothing: no request for it, no record, the rest judged."""
    sols, truth = make_solutions(3)
    empty = {"id": 99, "problem": "p", "steps": []}
    rc, printed, recs = judge_cli(tmp_path, toy_tokenizer_dir, capsys, [s.record for s in sols] + [empty])
    assert rc == 0 and "1 solutions with no steps left out" in printed and "solutions.jsonl:4" in printed
    assert "requests: 3 sent" in printed
    assert sorted(r["id"] for r in recs) == sorted(truth)
    assert all(r["judge"]["first_error"] == truth[r["id"]] for r in recs)


def test_local_backend_round_trip(tmp_path, toy_tokenizer_dir, toy_tokenizer):
    """A tiny random model: the prompt is built with the chat template, prm_jax.generate runs, and the
    reply (whatever it is) is parsed to None or a valid index; the text equals a direct generate call."""
    import torch
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM as HFCausalLM

    from prm_jax.labeling.commands import local_client
    from prm_jax.models.hf import load_causal_lm
    from prm_jax.sampling.sampler import generate

    torch.manual_seed(0)
    model_dir = tmp_path / "judge"
    HFCausalLM(HFConfig(vocab_size=len(toy_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
               ).save_pretrained(model_dir)
    toy_tokenizer.save_pretrained(model_dir)
    tpl = tmp_path / "short.txt"
    tpl.write_text("---\nindex_base: 1\n---\n{problem}\n{steps}\n")
    sols = [Solution({"id": i, "problem": f"3 + {i} = ?", "steps": ["3 + 12 = 15", "15 * 4 = 60"]}, f"mem:{i}")
            for i in range(2)]
    client = local_client(str(model_dir), str(model_dir), SamplingParams(max_new_tokens=6, temperature=0.0))
    out = tmp_path / "out.jsonl"
    s = run(judge_with(client, sols, out, template=str(tpl), batch_size=2))
    recs = read_out(out)
    assert s.judged == 2 and s.requests == 1 and s.completion_tokens > 0
    for r in recs:
        assert r["judge"]["first_error"] in (None, -1, 0, 1)
    msgs = [{"role": "user", "content": "3 + 0 = ?\n<paragraph_1>\n3 + 12 = 15\n</paragraph_1>\n\n"
                                        "<paragraph_2>\n15 * 4 = 60\n</paragraph_2>"}]
    ids = toy_tokenizer.encode(toy_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                               add_special_tokens=False)
    # the same batch shape as the client's call, so no new compilation
    direct = generate(load_causal_lm(str(model_dir)), [ids, ids], max_new_tokens=6, temperature=0.0,
                      stop_ids=sorted(client.stop_ids))[0]
    expect = toy_tokenizer.decode([t for t in direct if t not in client.stop_ids], skip_special_tokens=True)
    assert next(r for r in recs if r["id"] == 0)["judge"]["raw"] == expect
