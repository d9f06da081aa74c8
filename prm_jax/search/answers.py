"""From a problem's finished candidates to its answers: step-score aggregation, and the four picks
search-and-learn reports from the same candidates (weighted best-of-N, PRM-argmax, majority vote,
pass@N). Pure functions: the grader comes in as a callable, so tests can check them by hand.

- aggregation of a candidate's step scores: `last` (the PRM's score of the last step, what
  search-and-learn uses by default), `min`, `prod`; a candidate with no scored step gets None and
  ranks below every scored one (and weighs 0 in a weighted vote);
- answers are compared with the project's grader: candidates whose normalised answers are equal
  form one class at once, and distinct classes merge when the grader calls their first answers
  equivalent (so "0.5" and "\\frac{1}{2}" vote together);
- weighted best-of-N: the class with the largest sum of aggregated scores (ties: the class seen
  first); majority: the class with the most members (ties: seen first); PRM-argmax: the single
  candidate with the highest aggregated score (ties: the earliest); pass@N: any candidate correct.
  A class is correct when its first member's answer is; a candidate with no final answer votes for
  nothing.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from prm_jax.evaluation import metrics
from prm_jax.grading import normalize_answer

AGGREGATIONS = ("last", "min", "prod")
_METRIC_NAME = {"last": "last", "min": "min", "prod": "product"}

# grade(preds, golds) -> [bool]: the project's Grader.grade_many, or anything with its signature
GradeFn = Callable[[Sequence[str | None], Sequence[str | None]], list[bool]]


def aggregate(scores: Sequence[float], how: str) -> float | None:
    """One score for a (partial) solution from its step scores; None when no step was scored."""
    if how not in _METRIC_NAME:
        raise ValueError(f"aggregation {how!r}: expected one of {', '.join(AGGREGATIONS)}")
    return metrics.aggregate(scores, _METRIC_NAME[how])


def answer_classes(answers: Sequence[str | None], grade: GradeFn) -> list[int | None]:
    """Class index per answer (None for no answer); classes are numbered in order of first appearance."""
    norm_class: dict[str, int] = {}
    reps: list[str] = []  # first answer of each string class
    string_class: list[int | None] = []
    for a in answers:
        if a is None:
            string_class.append(None)
            continue
        key = normalize_answer(a)
        if key not in norm_class:
            norm_class[key] = len(reps)
            reps.append(a)
        string_class.append(norm_class[key])
    # Merge string classes the grader calls equivalent (union-find onto the earliest class).
    parent = list(range(len(reps)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    pairs = [(i, j) for j in range(len(reps)) for i in range(j)]
    if pairs:
        same = grade([reps[j] for i, j in pairs], [reps[i] for i, j in pairs])
        for (i, j), ok in zip(pairs, same):
            if ok:
                ri, rj = root(i), root(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    roots = sorted({root(i) for i in range(len(reps))})
    renumber = {r: k for k, r in enumerate(roots)}
    return [None if c is None else renumber[root(c)] for c in string_class]


def pick_answers(answers: Sequence[str | None], scores: Sequence[float | None], correct: Sequence[bool],
                 grade: GradeFn) -> dict:
    """The four picks from one problem's candidates (same order in every argument):
    {"weighted"|"prm_argmax"|"majority": {"index", "answer", "correct"}, "pass": bool}, where index
    is the candidate carrying the picked answer (-1 and answer None when nothing could be picked)."""
    if not (len(answers) == len(scores) == len(correct)):
        raise ValueError(f"{len(answers)} answers, {len(scores)} scores, {len(correct)} grades: expected one each")
    classes = answer_classes(answers, grade)
    first: dict[int, int] = {}
    weight: dict[int, float] = {}
    count: dict[int, int] = {}
    for i, c in enumerate(classes):
        if c is None:
            continue
        first.setdefault(c, i)
        weight[c] = weight.get(c, 0.0) + (scores[i] or 0.0)
        count[c] = count.get(c, 0) + 1

    def pick(i: int) -> dict:
        return {"index": i, "answer": answers[i] if i >= 0 else None, "correct": bool(i >= 0 and correct[i])}

    def best_class(value: dict[int, float]) -> int:
        if not value:
            return -1
        return first[max(value, key=lambda c: (value[c], -first[c]))]

    return {"weighted": pick(best_class(weight)), "prm_argmax": pick(metrics.argmax_first(list(scores))),
            "majority": pick(best_class(count)), "pass": any(bool(c) for c in correct)}
