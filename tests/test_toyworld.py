"""The toy world: generator, exact step checker, error injector, critic data, truth metrics.

References are independent of the code under test: a small interpreter of the problem text
written here, hand-written solutions with hand-derived labels, hand-computed metrics, and the
judge module's own verdict parser for the critic replies."""
import math
import random
import re

import pytest

from prm_jax.toyworld import truth, world
from prm_jax.toyworld.world import ERROR_KINDS, WorldConfig, check_steps

# ------------------------------------------------------------------ an independent reading of the text

_SENTENCES = [  # (regex on one sentence, op)
    (r"(?:finds|buys) (\d+) more \w+", "+"),
    (r"(?:gives away|loses) (\d+) \w+", "-"),
    (r"ends up with (\d+) times as many \w+", "*"),
    (r"the number of \w+ (?:he|she) has grows (\d+) times", "*"),
    (r"splits the \w+ into (\d+) equal piles and keeps one pile", "/"),
    (r"puts the \w+ into (\d+) equal boxes and keeps one box", "/"),
]


def interpret(problem: str) -> tuple[int, list[tuple[str, int]], int]:
    """(start, ops, answer) read from the problem text alone."""
    sentences = [s.strip() for s in problem.split(".") if s.strip()]
    start = int(re.fullmatch(r"\w+ has (\d+) \w+", sentences[0]).group(1))
    assert sentences[-1].startswith("How many")
    ops, value = [], start
    for s in sentences[1:-1]:
        s = re.sub(r"^Then ", "", s)
        s = s[0].lower() + s[1:]
        s = re.sub(r"^(?:he|she) ", "", s)
        for pattern, op in _SENTENCES:
            m = re.fullmatch(pattern, s)
            if m:
                n = int(m.group(1))
                ops.append((op, n))
                assert op != "/" or value % n == 0
                value = {"+": value + n, "-": value - n, "*": value * n, "/": value // n}[op]
                break
        else:
            raise AssertionError(f"unknown sentence {s!r}")
    return start, ops, value


def test_generator_is_deterministic_and_matches_its_text():
    cfg = WorldConfig(min_steps=2, max_steps=5, ops=("+", "-", "*", "/"), max_value=60)
    a = world.generate_problems(200, seed=5, cfg=cfg)
    assert a == world.generate_problems(200, seed=5, cfg=cfg)
    assert [r["problem"] for r in a] != [r["problem"] for r in world.generate_problems(200, seed=6, cfg=cfg)]
    assert len({r["id"] for r in a}) == 200
    seen_ops = set()
    for rec in a:
        start, ops, answer = interpret(rec["problem"])
        assert start == rec["world"]["start"]
        assert ops == [tuple(o) for o in rec["world"]["ops"]]
        assert rec["answer"] == str(answer)
        assert 2 <= len(ops) <= 5
        # every running value is a non-negative integer within max_value
        value = start
        for op, n in ops:
            if op == "/":
                assert value % n == 0
            value = {"+": value + n, "-": value - n, "*": value * n, "/": value // n}[op]
            assert 0 <= value <= cfg.max_value
            seen_ops.add(op)
    assert seen_ops == {"+", "-", "*", "/"}


# ------------------------------------------------------------------ the checker on hand-written steps

W = {"start": 7, "ops": [["+", 5], ["-", 3], ["*", 2]]}  # 7 -> 12 -> 9 -> 18
RIGHT = ["7 + 5 = 12", "12 - 3 = 9", "9 * 2 = 18. The answer is \\boxed{18}."]

CASES = [  # (steps, first error, reason, final answer correct)
    (RIGHT, -1, None, True),
    (["7+5=12", "12 -3= 9", "9 x 2 = 18", "The answer is \\boxed{ 18 }."], -1, None, True),
    (["7 + 5 = 13", "13 - 3 = 10", "10 * 2 = 20. The answer is \\boxed{20}."], 0, "arithmetic", False),
    (["7 + 5 = 12", "12 - 4 = 8", "8 * 2 = 16. The answer is \\boxed{16}."], 1, "wrong_operand", False),
    (["7 + 5 = 12", "12 + 3 = 15", "15 * 2 = 30. The answer is \\boxed{30}."], 1, "wrong_operation", False),
    (["7 + 5 = 12", "13 - 3 = 10", "10 * 2 = 20. The answer is \\boxed{20}."], 1, "wrong_carry", False),
    (["7 + 5 = 12", "12 * 2 = 24. The answer is \\boxed{24}."], 1, "wrong_operation", False),  # skipped "- 3"
    (["7 + 5 = 12", "then take away three", "9 * 2 = 18. The answer is \\boxed{18}."], 1, "unparseable", True),
    # a correct-looking (even true) step after an earlier error does not move the label
    (["7 + 5 = 13", "12 - 3 = 9", "9 * 2 = 18. The answer is \\boxed{18}."], 0, "arithmetic", True),
    (["7 + 5 = 12. The answer is \\boxed{12}."], 0, "premature_answer", False),
    (["7 + 5 = 12", "12 - 3 = 9"], 1, "unfinished", False),
    (["7 + 5 = 12", "12 - 3 = 9", "9 * 2 = 18"], 2, "missing_answer", False),
    (RIGHT + ["18 + 0 = 18"], 3, "after_answer", True),
    (["7 + 5 = 12", "12 - 3 = 9", "9 * 2 = 18", "18 - 1 = 17"], 3, "extra_step", False),
    (["7 + 5 = 12", "12 - 3 = 9", "9 * 2 = 18. The answer is \\boxed{17}."], 2, "wrong_answer", False),
]


# Steps that first restate the sentence they apply (a restating world's style) are judged by their
# equation alone, in any world.
W_SAID = {**W, "name": "Ana", "item": "apples", "phrasing": [0, 0, 0], "restate": True}
RIGHT_SAID = ["She finds 5 more apples: 7 + 5 = 12", "She gives away 3 apples: 12 - 3 = 9",
              "She ends up with 2 times as many apples: 9 * 2 = 18. The answer is \\boxed{18}."]
CASES += [
    (RIGHT_SAID, -1, None, True),
    (["She finds 5 more apples: 7 + 5 = 12", "She gives away 3 apples: 12 - 4 = 8",
      "She ends up with 2 times as many apples: 8 * 2 = 16. The answer is \\boxed{16}."], 1, "wrong_operand", False),
    # restating the wrong sentence, then applying it, skips an operation
    (["She gives away 3 apples: 7 - 3 = 4", "She finds 5 more apples: 4 + 5 = 9",
      "She ends up with 2 times as many apples: 9 * 2 = 18. The answer is \\boxed{18}."], 0, "wrong_operation", True),
    (["She finds 5 more apples 7 + 5 = 12", "12 - 3 = 9", "9 * 2 = 18. The answer is \\boxed{18}."],
     0, "unparseable", True),
]

# MC's failure modes by construction: a check undoes the step just taken (a quantity the answer never
# uses), a restart re-derives from the problem's numbers. Their truth, derived by hand.
CASES += [
    (["7 + 5 = 12", "Check: 12 - 5 = 7"] + RIGHT[1:], -1, None, True),
    # a wrong check (the step repeated, not undone) is the first error although the answer is right
    (["7 + 5 = 12", "Check: 12 + 5 = 17"] + RIGHT[1:], 1, "wrong_check", True),
    (["Check: 7 - 5 = 2"] + RIGHT, 0, "wrong_check", True),  # nothing to check yet
    (RIGHT[:1] + ["Check: 12 - 5 = 7. The answer is \\boxed{7}."] + RIGHT[1:], 1, "wrong_check", True),
    # a restart after a wrong step reaches the right answer; the wrong step stays the first error
    (["7 + 5 = 12", "12 + 3 = 15", "Start again: 7 + 5 = 12"] + RIGHT[1:], 1, "wrong_operation", True),
    (["7 + 5 = 12", "Start again: 7 + 5 = 12"] + RIGHT[1:], -1, None, True),  # a needless restart is no error
    (["7 + 5 = 12", "Start again: 12 - 3 = 9"] + RIGHT[2:], 1, "wrong_carry", True),  # restarts from the start
    (["She finds 5 more apples: 7 + 5 = 13", "Start again. She finds 5 more apples: 7 + 5 = 12"] + RIGHT_SAID[1:],
     0, "arithmetic", True),
]


def test_restating_world_writes_the_problem_sentences():
    assert world.write_solution(W_SAID) == RIGHT_SAID
    assert world.render_problem(W_SAID).startswith("Ana has 7 apples. She finds 5 more apples. Then she gives away")
    cfg = WorldConfig(min_steps=2, max_steps=5, ops=("+", "-", "*", "/"), restate=True)
    for rec in world.generate_problems(50, seed=8, cfg=cfg):
        sentences = [s.strip() for s in rec["problem"].split(".")][1:-1]
        said = [step.split(":")[0] for step in world.write_solution(rec)]
        assert said == [re.sub(r"^Then (\w)", lambda m: m.group(1).upper(), s) for s in sentences]
        assert check_steps(rec, world.write_solution(rec)).first_error == -1


@pytest.mark.parametrize("steps,first_error,reason,final_ok", CASES)
def test_check_steps_hand_written(steps, first_error, reason, final_ok):
    v = check_steps(W, steps)
    assert (v.first_error, v.reason, v.final_answer_correct) == (first_error, reason, final_ok)
    cut = len(steps) if first_error < 0 else first_error
    assert v.step_correct == tuple(i < cut for i in range(len(steps)))
    # a record with a "world" key is accepted the same way
    assert check_steps({"id": "x", "world": W}, steps).first_error == first_error


def test_check_steps_edge_cases():
    assert check_steps(W, []).first_error is None
    with pytest.raises(ValueError, match="toy world"):
        check_steps({"id": "r1", "problem": "?"}, RIGHT)
    with pytest.raises(TypeError):
        check_steps(W, "7 + 5 = 12")
    assert world.write_solution(W) == RIGHT


# ------------------------------------------------------------------ the error injector

@pytest.mark.parametrize("restate", [False, True])
def test_injector_puts_the_advertised_first_error(restate):
    cfg = WorldConfig(max_steps=5, ops=("+", "-", "*", "/"), restate=restate)
    problems = world.generate_problems(150, seed=11, cfg=cfg)
    rng = random.Random(0)
    made = {k: 0 for k in ERROR_KINDS}
    for rec in problems:
        ref = world.write_solution(rec)
        for kind in ERROR_KINDS:
            for step in range(len(rec["world"]["ops"])):
                steps = world.inject_error(rec, kind, step, rng)
                if steps is None:
                    continue
                made[kind] += 1
                v = check_steps(rec, steps)
                assert v.first_error == step, (rec["world"], kind, step, steps)
                expected = {"wrong_operation", "wrong_operand"} if kind == "skipped_step" else {kind}
                assert v.reason in expected
                assert steps[:step] == ref[:step]
                assert world.extract_answer(steps) is not None  # the wrong solution still ends in an answer
    assert all(n > 50 for n in made.values()), made


def test_injector_hand_case():
    steps = world.inject_error(W, "arithmetic", 1, random.Random(3))
    assert steps[0] == "7 + 5 = 12"
    a, op, b, c = re.fullmatch(r"(\d+) (.) (\d+) = (\d+)", steps[1]).groups()
    assert (a, op, b) == ("12", "-", "3") and c != "9"
    # continued consistently from the wrong value, boxed at the end
    assert steps[2] == f"{c} * 2 = {int(c) * 2}. The answer is \\boxed{{{int(c) * 2}}}."
    assert world.inject_error(W, "skipped_step", 2, random.Random(0)) is None  # last op cannot be skipped here


def test_sample_solutions_and_processbench_records():
    problems = world.generate_problems(60, seed=2)
    sols = world.sample_solutions(problems, seed=4, error_rate=0.5)
    assert sols == world.sample_solutions(problems, seed=4, error_rate=0.5)
    wrong = [s for s in sols if s["generator"].startswith("toy-error:")]
    assert 15 < len(wrong) < 45
    for s in sols:
        pb = world.processbench_record(s)
        assert set(pb) >= {"id", "generator", "problem", "steps", "final_answer_correct", "label", "world"}
        assert (pb["label"] == -1) == (s["generator"] == "toy-reference")
        assert pb["final_answer_correct"] == (s["final_answer"] == s["answer"])


def test_heldout_balanced_set_prefers_the_policys_own_errors():
    """As many erroneous as correct records, half the records (at least 8) of each. Short of errors,
    the policy is asked once for more (they join as "-more") before the world injects any; short of
    correct ones, the world's reference solutions fill in."""
    from prm_jax.toyworld.heldout import balanced_set, processbench_records

    problems = world.generate_problems(10, seed=5, cfg=WorldConfig.tiny(), id_prefix="h")

    def policy(error_rate: float, tag: str) -> list[dict]:  # 20 ProcessBench records, all right or all wrong
        sols = world.sample_solutions(problems, seed=1, error_rate=error_rate, per_problem=2)
        return [{**r, "id": r["id"] + tag} for r in processbench_records(sols)]

    def world_ids(seed: int, error_rate: float, k: int) -> set[str]:  # what the world fills in
        return {s["id"] for s in world.sample_solutions(problems, seed=seed, error_rate=error_rate)[:k]}

    def ids(records):
        return {r["id"] for r in records}

    def split(chosen):
        n = len(chosen) // 2
        assert all(r["label"] >= 0 for r in chosen[:n]) and all(r["label"] == -1 for r in chosen[n:])
        return chosen[:n], chosen[n:]

    right, wrong, more_wrong = policy(0.0, "-r"), policy(1.0, "-w"), policy(1.0, "-x")

    def never():
        raise AssertionError("enough errors: no more samples")

    # 12 wrong + 8 right: want 10 of each; 2 of the world's reference solutions (seed + 2) join
    w, r = split(balanced_set(wrong[:12] + right[:8], problems, seed=7, more=never))
    assert len(w) == 10 and ids(w) < ids(wrong[:12])
    assert ids(r) == ids(right[:8]) | world_ids(9, 0.0, 2)
    # 2 wrong + 18 right: the policy's 5 more (3 wrong) first, then 5 of the world's errors (seed + 3)
    calls = []
    more = lambda: calls.append(1) or more_wrong[:3] + right[18:]  # noqa: E731
    chosen = balanced_set(wrong[:2] + right[:18], problems, seed=7, more=more)
    w, r = split(chosen)
    assert calls == [1] and len(w) == len(r) == 10 and ids(r) < ids(right[:18])
    assert ids(w) == ids(wrong[:2]) | {i + "-more" for i in ids(more_wrong[:3])} | world_ids(10, 1.0, 5)
    assert chosen == balanced_set(wrong[:2] + right[:18], problems, seed=7, more=more)  # seeded
    # 3 right, nothing more to ask: at least 8 of each, from the world
    w, r = split(balanced_set(right[:3], problems, seed=0))
    assert ids(w) == world_ids(3, 1.0, 8) and ids(r) == ids(right[:3]) | world_ids(2, 0.0, 5)


# ------------------------------------------------------------------ MC's failure modes by construction

def _exact(preds, golds):
    return [p is not None and p == g for p, g in zip(preds, golds)]


def _mc(solutions, problems, n=4, **completer):
    """MC labels of `solutions` (mode all, one success is enough) with the scripted completer."""
    from prm_jax.labeling import mc
    from prm_jax.toyworld.failures import ScriptedCompleter

    labels = mc.label_solutions(solutions, ScriptedCompleter(problems, seed=1, **completer), mc.MCConfig(n=n),
                                grade=_exact)
    return [{**s, "mc": m} for s, m in zip(solutions, labels)]


def test_failure_mode_settings_produce_the_intended_mc_cases():
    """Each failure-mode share of the world, at 1, makes the labelled case it is built for, read
    against the world's checker: a restarted solution and a wrong check reach the right answer
    (MC: right, truth: wrong at that step), a completer that slips fails from right steps (MC: wrong,
    truth: right). At 0 the solutions are the plain world's and MC equals the truth."""
    from prm_jax.toyworld.failures import mc_failures

    cfg = WorldConfig.tiny(max_start=9, max_operand=5, max_value=9)
    problems = world.generate_problems(60, seed=3, cfg=cfg)
    n_ops = {p["id"]: len(p["world"]["ops"]) for p in problems}

    def truth_of(s):
        return check_steps(s, s["steps"])

    plain = world.sample_solutions(problems, seed=4, error_rate=0.5)
    assert plain == world.sample_solutions(problems, seed=4, error_rate=0.5, restart_rate=0.0, check_rate=0.0,
                                           slip_rate=0.0)
    counts = mc_failures(_mc(plain, problems))
    assert counts["agree"] == counts["n"] == len(plain) and counts["solutions_restarting"] == 0

    # restarts: every injected error before the last step is followed by the solution started again
    restarted = world.sample_solutions(problems, seed=4, error_rate=1.0, kinds=("wrong_operation",), restart_rate=1.0)
    early = [s for s in restarted if truth_of(s).first_error < n_ops[s["id"].rpartition("-s")[0]] - 1]
    assert early and all(s["generator"].endswith("+restart") and truth_of(s).final_answer_correct for s in early)
    labelled = _mc(restarted, problems, restart_rate=1.0)
    for s in labelled:  # MC says right where the truth says wrong, exactly on the restarted ones
        assert (s["mc"]["first_error"] == -1) == (s in [dict(e, mc=s["mc"]) for e in early])
    counts = mc_failures(labelled)
    assert counts["wrong_step_passed"] == {"unused_quantity": 0, "rederived": len(early)}
    assert counts["solutions_restarting"] == len(early) and counts["right_step_failed"] == 0

    # checks: half the erroneous solutions carry a wrong check as their only error, the answer right
    checked = world.sample_solutions(problems, seed=5, error_rate=0.5, check_rate=1.0)
    wrong_checks = [s for s in checked if truth_of(s).reason == "wrong_check"]
    assert wrong_checks and all(truth_of(s).final_answer_correct for s in wrong_checks)
    assert all(s["generator"] == "toy-error:wrong_check" for s in wrong_checks)
    counts = mc_failures(_mc(checked, problems))
    assert counts["wrong_step_passed"] == {"unused_quantity": len(wrong_checks), "rederived": 0}
    with_check = [s for s in checked if "check" in s["generator"]]  # not where an error precedes the check
    assert all(s in with_check for s in checked if truth_of(s).first_error == -1)
    assert counts["solutions_with_check"] == len(with_check) and counts["right_step_failed"] == 0

    # a completer that always slips fails from every right step but the last: MC blames step 0
    right = world.sample_solutions(problems, seed=6, error_rate=0.0)
    labelled = _mc(right, problems, slip_rate=1.0)
    assert all(s["mc"]["first_error"] == 0 and truth_of(s).first_error == -1 for s in labelled)
    assert mc_failures(labelled)["right_step_failed"] == len(right)
    # and the policy's training solutions carry the slip at the share asked for
    slipped = world.sample_solutions(problems, seed=6, error_rate=0.0, slip_rate=1.0)
    assert all(truth_of(s).first_error == n_ops[s["id"].rpartition("-s")[0]] - 1 for s in slipped)


# ------------------------------------------------------------------ truth metrics, by hand

def test_baseline_f1_hand_set():
    three = ["a", "b", "c"]
    records = [
        {"steps": three, "final_answer_correct": True, "label": -1},   # pred -1: right
        {"steps": three, "final_answer_correct": True, "label": -1},   # pred -1: right
        {"steps": three, "final_answer_correct": False, "label": 2},   # pred 2: right
        {"steps": three, "final_answer_correct": False, "label": 0},   # pred 2: wrong
        {"steps": three, "final_answer_correct": True, "label": 1},    # pred -1: wrong
    ]
    assert [truth.outcome_baseline(r) for r in records] == [-1, -1, 2, 2, -1]
    got = truth.baseline_f1(records)
    assert got["acc_error"] == pytest.approx(1 / 3) and got["acc_correct"] == 1.0
    assert got["f1"] == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))  # = 0.5
    assert (got["n_error"], got["n_correct"]) == (3, 2)


def test_blind_f1_hand_set():
    """Dev errors all at step 1: flagging step 1 of a share p scores 2p(1-p)/(p + 1-p) = 2p(1-p),
    best at p = 1/2. On a test set with 1 of 4 errors at step 1 it then expects 1/8 and 1/2."""
    three = ["a", "b", "c"]
    dev = [{"steps": three, "label": y} for y in (1, 1, -1, -1)]
    test = [{"steps": three, "label": y} for y in (0, 0, 1, 2, -1, -1)]
    got = truth.blind_f1(dev, test)
    assert (got["step"], got["share_flagged"]) == (1, 0.5)
    assert (got["acc_error"], got["acc_correct"]) == (pytest.approx(1 / 8), pytest.approx(1 / 2))
    assert got["f1"] == pytest.approx(2 * (1 / 8) * (1 / 2) / (1 / 8 + 1 / 2))  # = 0.2


def test_label_quality_hand_case():
    three = ["s0", "s1", "s2"]
    t = {"a": -1, "b": 1, "c": 2, "d": 0}
    judged = [
        {"id": "a", "steps": three, "judge": {"first_error": -1}},
        {"id": "b", "steps": three, "judge": {"first_error": 1}},
        {"id": "c", "steps": three, "judge": {"first_error": 0}},
        {"id": "d", "steps": three, "judge": {"first_error": None}},  # unparsed verdict
        {"id": "e", "steps": three, "judge": {"first_error": 1}},     # no truth
    ]
    q = truth.label_quality(judged, t, "judge")
    assert (q["n"], q["n_unlabelled"], q["n_no_truth"]) == (3, 1, 1)
    assert q["first_error_accuracy"] == pytest.approx(2 / 3)
    assert q["earlier"] == pytest.approx(1 / 3) and q["later"] == 0
    # labelled steps: a 0,1,2 (all correct, truly correct); b 0 ok/ok, 1 err/err; c 0 err/truly ok
    # error class: tp=1 (b1), fp=1 (c0), fn=0; correct class: tp=4, fp=0, fn=1
    assert q["n_steps"] == 6 and q["step_accuracy"] == pytest.approx(5 / 6)
    assert (q["step_precision"], q["step_recall"]) == (0.5, 1.0)
    assert q["step_f1"] == pytest.approx(2 / 3)
    assert (q["correct_precision"], q["correct_recall"]) == (1.0, 0.8)
    assert q["correct_f1"] == pytest.approx(8 / 9)
    assert q["false_correct"] == 0 and q["false_error"] == 0

    # training records (consensus output): labels up to the first error; MC blocks
    train = [{"id": "b", "labels": [1, 0]}, {"id": "c", "labels": [1, 1, 1]}]
    q = truth.label_quality(train, t, "labels")
    assert q["n"] == 2 and q["first_error_accuracy"] == 0.5 and q["later"] == 0.5
    assert q["false_correct"] == 0.5 and math.isnan(q["false_error"])
    mc = [{"id": "a", "steps": three, "mc": {"first_error": 1}}, {"id": "d", "steps": three, "mc": {"first_error": 7}}]
    q = truth.label_quality(mc, t, "mc")
    assert (q["n"], q["n_unlabelled"], q["false_error"]) == (1, 1, 1.0)
    assert truth.clean_nan(q)["first_error_accuracy"] == 0.0


def test_true_first_errors():
    recs = [{"id": "r", "world": W, "steps": CASES[4][0]}, {"id": "s", "world": W, "steps": RIGHT}]
    assert truth.true_first_errors(recs) == {"r": 1, "s": -1}


# ------------------------------------------------------------------ tokenizer and critic

def test_tokenizer_round_trip(tmp_path):
    from prm_jax.toyworld.tokenizer import train_tokenizer

    tok = train_tokenizer(world.tokenizer_corpus(60, seed=1), str(tmp_path), vocab_size=320)
    problems = world.generate_problems(10, seed=99, cfg=WorldConfig(ops=("+", "-", "*", "/")))
    for sol in world.sample_solutions(problems, seed=1, error_rate=0.5):
        messages = world.chat_messages(sol["problem"], sol["steps"])
        text = world.render_chat(messages)
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert tok.apply_chat_template(messages, tokenize=False) == text
        assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
        digits = [t for t in tok.convert_ids_to_tokens(ids) if any(ch.isdigit() for ch in t)]
        assert all(len(t) == 1 for t in digits)  # one digit per token


@pytest.mark.parametrize("template_name", ["toy", "boxed", "default"])
def test_critic_reply_parses_to_the_truth(template_name):
    from prm_jax.labeling.judge import load_template, parse_verdict
    from prm_jax.toyworld import critic

    template = critic.toy_judge_template() if template_name == "toy" else load_template(template_name)
    problems = world.generate_problems(40, seed=8)
    sols = world.sample_solutions(problems, seed=3, error_rate=0.7)
    sols += world.sample_solutions(problems, seed=4, error_rate=0.7, restart_rate=0.5, check_rate=0.5, slip_rate=0.3)
    sols.append({**problems[0], "id": "free-form", "steps": ["no idea", "The answer is \\boxed{3}."]})
    for sol in sols:
        reply = critic.critic_reply(sol, sol["steps"], template.index_base, template.verdict)
        want = check_steps(sol, sol["steps"]).first_error
        assert parse_verdict(reply, len(sol["steps"]), template.index_base, template.verdict) == want
    examples = critic.critic_examples(sols[:5], template)
    assert [e["messages"][-1]["role"] for e in examples] == ["assistant"] * 5
    # the critic redoes each step's computation before its verdict: a check is expected to undo the step
    reply = critic.critic_reply(W, ["7 + 5 = 12", "Check: 12 + 5 = 17"] + RIGHT[1:])
    assert reply == ("Paragraph 0: 7 + 5 = 12, correct.\nParagraph 1: expected Check: 12 - 5 = 7; wrong check, "
                     "incorrect.\n\\boxed{1}")
    reply = critic.critic_reply(W, ["7 + 5 = 12", "12 + 3 = 15", "Start again: 7 + 5 = 12"] + RIGHT[1:])
    assert reply.splitlines()[1] == "Paragraph 1: expected 12 - 3 = 9; wrong operation, incorrect."
    assert sols[0]["problem"] in examples[0]["messages"][-2]["content"]


def test_cli_problems_solutions_truth(tmp_path):
    from prm_jax.cli import main, run
    from prm_jax.records import RecordError, read_jsonl

    p, s, t = (str(tmp_path / f) for f in ("p.jsonl", "s.jsonl", "t.jsonl"))
    assert main(["toy", "problems", "--n", "30", "--seed", "3", "--size", "tiny", "--out", p]) == 0
    problems = read_jsonl(p)
    assert len(problems) == 30 and all(2 <= len(r["world"]["ops"]) <= 3 for r in problems)
    assert all(interpret(r["problem"])[2] == int(r["answer"]) for r in problems)
    assert main(["toy", "solutions", "--problems", p, "--out", s, "--per-problem", "2", "--error-rate", "0.5"]) == 0
    assert main(["toy", "truth", "--solutions", s, "--out", t]) == 0
    rows = read_jsonl(t)
    assert len(rows) == 60
    for row in rows:
        assert (row["label"] == -1) == (row["generator"] == "toy-reference")
    # --restate: the solutions of these problems restate each sentence before its equation
    assert main(["toy", "problems", "--n", "5", "--size", "tiny", "--restate", "--out", p]) == 0
    assert main(["toy", "solutions", "--problems", p, "--out", s, "--error-rate", "0"]) == 0
    for sol in read_jsonl(s):
        sentences = [x.strip() for x in sol["problem"].split(".")][1:-1]
        assert [step.split(": ")[0] for step in sol["steps"]] == [re.sub(r"^Then (\w)", lambda m: m.group(1).upper(), x)
                                                                   for x in sentences]
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "problem": "x", "answer": "1"}\n')
    with pytest.raises(RecordError, match=r"bad.jsonl:1: .*toy world"):
        run(["toy", "solutions", "--problems", str(tmp_path / "bad.jsonl"), "--out", s])
