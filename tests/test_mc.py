"""MC step labels on a scripted policy whose success count per prefix is known."""
import math

import pytest

from prm_jax.grading import is_equivalent
from prm_jax.labeling.mc import MCConfig, hard_labels, label_solutions, max_probes, soft_labels

N = 8


def grade_inprocess(preds, golds):
    return [is_equivalent(p, g) for p, g in zip(preds, golds)]


class ScriptedPolicy:
    """From prefix steps[:i+1] of solution `id`, exactly table[id][i] of the n completions end in
    the gold answer (a `\\boxed{}` of it); the others end in a wrong one. Records every probe."""

    def __init__(self, table, golds):
        self.table, self.golds = table, golds
        self.calls = []

    def __call__(self, requests, n):
        self.calls.append([r.key for r in requests])
        out = []
        for r in requests:
            sid, i = r.key.rsplit("/", 1)
            assert tuple(self.steps[sid][: int(i) + 1]) == r.steps  # the prefix is steps[:i+1]
            good = self.table[sid][int(i)]
            out.append([f"so the answer is \\boxed{{{self.golds[sid]}}}" if k < good else "\\boxed{-1}"
                        for k in range(n)])
        return out

    @property
    def probes(self):
        return [k for call in self.calls for k in call]


def make(table):
    golds = {sid: str(100 + j) for j, sid in enumerate(table)}
    sols = [{"id": sid, "problem": f"problem {sid}", "answer": golds[sid],
             "steps": [f"{sid} step {i}" for i in range(len(c))]} for sid, c in table.items()]
    pol = ScriptedPolicy(table, golds)
    pol.steps = {s["id"]: s["steps"] for s in sols}
    return sols, pol


TABLE = {
    "A": [8, 5, 2, 0, 0, 0],  # first error at step 3
    "B": [3, 3, 1, 8],  # no error
    "C": [0, 0, 0],  # wrong from the start
}


def test_mode_all():
    sols, pol = make(TABLE)
    mc = label_solutions(sols, pol, MCConfig(n=N, mode="all"), grade=grade_inprocess)
    assert [m["correct"] for m in mc] == [TABLE["A"], TABLE["B"], TABLE["C"]]
    assert [m["first_error"] for m in mc] == [3, -1, 0]
    assert [m["rollouts"] for m in mc] == [6 * N, 4 * N, 3 * N]
    assert len(pol.calls) == 1  # one batched round
    assert hard_labels(mc[0]) == [1, 1, 1, 0, 0, 0]
    assert soft_labels(mc[0]) == [1.0, 5 / 8, 2 / 8, 0.0, 0.0, 0.0]
    assert mc[0]["n"] == N and mc[0]["mode"] == "all"


def test_threshold():
    sols, pol = make(TABLE)
    mc = label_solutions(sols, pol, MCConfig(n=N, mode="all", threshold=2), grade=grade_inprocess)
    assert [m["first_error"] for m in mc] == [2, 2, 0]  # counts <= 2 are negatives
    assert hard_labels(mc[1]) == [1, 1, 0, 1]  # "all" keeps what it saw, even after the first error


def test_mode_first_error():
    sols, pol = make(TABLE)
    mc = label_solutions(sols, pol, MCConfig(n=N, mode="first-error"), grade=grade_inprocess)
    assert mc[0]["correct"] == [8, 5, 2, 0, None, None]
    assert mc[1]["correct"] == [3, 3, 1, 8]
    assert mc[2]["correct"] == [0, None, None]
    assert [m["first_error"] for m in mc] == [3, -1, 0]
    assert [m["rollouts"] for m in mc] == [4 * N, 4 * N, 1 * N]
    assert hard_labels(mc[0]) == [1, 1, 1, 0, 0, 0]
    assert soft_labels(mc[0])[4:] == [None, None]


def test_mode_binary_hand_traced():
    sols, pol = make(TABLE)
    mc = label_solutions(sols, pol, MCConfig(n=N, mode="binary"), grade=grade_inprocess)
    # A (K=6): probe 3 (0 -> hi=3), probe 1 (5 -> lo=2), probe 2 (2 -> lo=3): first error 3.
    assert mc[0]["correct"] == [None, 5, 2, 0, None, None] and mc[0]["first_error"] == 3
    # B (K=4): probe 2 (1 -> lo=3), probe 3 (8 -> lo=4): no error.
    assert mc[1]["correct"] == [None, None, 1, 8] and mc[1]["first_error"] == -1
    # C (K=3): probe 1 (0 -> hi=1), probe 0 (0 -> hi=0): first error 0.
    assert mc[2]["correct"] == [0, 0, None] and mc[2]["first_error"] == 0
    assert [m["rollouts"] for m in mc] == [3 * N, 2 * N, 2 * N]
    assert hard_labels(mc[0]) == [1, 1, 1, 0, 0, 0]
    assert hard_labels(mc[1]) == [1, 1, 1, 1]
    assert len(pol.calls) == 3  # rounds, each batched across the solutions still searching


@pytest.mark.parametrize("k", [1, 2, 7, 40])
def test_binary_is_logarithmic_and_exact(k):
    # Monotone policy: every rollout succeeds from prefixes before step j, none from j on.
    table = {f"s{j}": [N if i < j else 0 for i in range(k)] for j in range(k + 1)}
    sols, pol = make(table)
    mc = label_solutions(sols, pol, MCConfig(n=N, mode="binary"), grade=grade_inprocess)
    bound = math.ceil(math.log2(k + 1))
    assert max_probes(k, "binary") == bound
    for j, m in enumerate(mc):
        assert m["first_error"] == (j if j < k else -1)
        assert m["rollouts"] <= bound * N
        assert hard_labels(m) == [int(i < j) for i in range(k)]
    per_solution = {}
    for key in pol.probes:
        per_solution[key.rsplit("/", 1)[0]] = per_solution.get(key.rsplit("/", 1)[0], 0) + 1
    assert max(per_solution.values()) <= bound
    # and "all" spends k prefixes per solution for the same answer
    sols, pol_all = make(table)
    mc_all = label_solutions(sols, pol_all, MCConfig(n=N, mode="all"), grade=grade_inprocess)
    assert [m["first_error"] for m in mc_all] == [m["first_error"] for m in mc]
    assert len(pol_all.probes) == k * (k + 1)


def test_last_step_of_finished_solution_counts_its_own_answer():
    # The last prefix of a finished solution is the whole trajectory: it is not rolled out, and its
    # count is N if its own final answer is right. This policy, asked to go on, boxes 2 whatever it
    # is given, which would turn both solutions' last-step labels around.
    sols = [{"id": "right", "problem": "p", "answer": "\\frac{1}{2}",
             "steps": ["half of 1", "so the answer is $\\boxed{0.5}$"]},
            {"id": "wrong", "problem": "p", "answer": "2", "steps": ["one and one", "so $\\boxed{3}$"]},
            {"id": "cut", "problem": "p", "answer": "2", "steps": ["one and one", "so it is"]}]  # no answer
    asked = []

    def boxes_two(requests, n):
        asked.extend(r.key for r in requests)
        return [["\\boxed{2}"] * n for _ in requests]

    mc = label_solutions(sols, boxes_two, MCConfig(n=4, mode="all", max_prefixes=2), grade=grade_inprocess)
    assert [m["correct"] for m in mc] == [[0, 4], [4, 0], [4, 4]]
    assert [m["first_error"] for m in mc] == [0, 1, -1]
    assert sorted(asked) == ["cut/0", "cut/1", "right/0", "wrong/0"]
    assert [m["rollouts"] for m in mc] == [4, 4, 8]


def test_empty_solution_and_chunking():
    sols, pol = make({"A": [8, 5, 2, 0, 0, 0], "E": []})
    mc = label_solutions(sols, pol, MCConfig(n=N, mode="all", max_prefixes=4), grade=grade_inprocess)
    assert mc[0]["correct"] == [8, 5, 2, 0, 0, 0]
    assert mc[1] == {"n": N, "correct": [], "first_error": -1, "mode": "all", "threshold": 0, "rollouts": 0}
    assert [len(c) for c in pol.calls] == [4, 2]


def test_bad_config():
    with pytest.raises(ValueError, match="mode"):
        MCConfig(mode="fast")
    with pytest.raises(ValueError, match="threshold"):
        MCConfig(n=4, threshold=4)
