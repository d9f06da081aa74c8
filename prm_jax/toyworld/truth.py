"""What the toy world's known truth says about label sources and PRMs (the demo's report).

Pure functions, no I/O. Truth is a mapping solution id -> true first error (from
`true_first_errors`, which runs `world.check_steps` on every record).

Conventions (the paper's, ProcessBench's):
- a label source gives one first error per solution: MC-labelled records `mc.first_error`,
  judge-labelled records `judge.first_error` (None = unparseable verdict: not labelled, counted
  apart), training records `labels` (first label < 0.5, -1 if none; consensus output);
- the step labels a first error implies are the ones PRM training uses: steps before it
  correct, it incorrect, later steps unlabelled (all steps correct when it is -1);
- a step is truly correct iff it and every step before it are right (`Verdict.step_correct`):
  a step after the true first error is wrong whatever it says, as it belongs to a wrong solution.
Step-level figures are computed over the steps a source labels. The error class is the positive
one ("this step is wrong": `step_precision`, `step_recall`, `step_f1`); the same figures with
"this step is correct" as the positive class are `correct_precision/recall/f1`.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prm_jax.errors import InputError
from prm_jax.evaluation.metrics import harmonic_mean, subset_metrics
from prm_jax.toyworld.world import check_steps

SOURCES = ("mc", "judge", "labels")


def true_first_errors(records: Iterable[Mapping[str, Any]]) -> dict[str, int | None]:
    """id -> true first error of every solution record (which must carry its "world")."""
    truth = {}
    for rec in records:
        if "id" not in rec or "steps" not in rec:
            raise InputError(f"solution record needs 'id' and 'steps', got keys {sorted(rec)}")
        truth[rec["id"]] = check_steps(rec, rec["steps"]).first_error
    return truth


def labels_first_error(labels: Sequence[float]) -> int:
    """First error implied by per-step labels (hard 0/1 or soft in [0, 1]; < 0.5 is wrong)."""
    for i, y in enumerate(labels):
        if y < 0.5:
            return i
    return -1


def source_first_error(record: Mapping[str, Any], source: str) -> int | None:
    """The first error a label source put on a record; None when it gave none (unparseable)."""
    if source == "labels":
        return labels_first_error(record["labels"])
    if source not in SOURCES:
        raise InputError(f"unknown label source {source!r} (expected one of {SOURCES})")
    block = record.get(source)
    if not isinstance(block, Mapping) or "first_error" not in block:
        raise InputError(f"record {record.get('id')!r}: no {source!r} block with a 'first_error'")
    return block["first_error"]


def implied_step_labels(first_error: int, n_steps: int) -> list[bool]:
    """Step labels (True = correct) a first error implies, over the steps it labels."""
    if first_error < 0:
        return [True] * n_steps
    return [True] * first_error + [False]


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else math.nan
    r = tp / (tp + fn) if tp + fn else math.nan
    if math.isnan(p) or math.isnan(r):
        return p, r, math.nan
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def label_quality(records: Iterable[Mapping[str, Any]], truth: Mapping[str, int | None],
                  source: str) -> dict[str, Any]:
    """How well one label source matches the truth.

    `records`: what the source produced (MC-labelled, judge-labelled or training records), each
    with an "id" found in `truth` and its "steps" (training records hold only the labelled steps;
    their count is taken from `labels`). Returns:
      n                      solutions the source labels (verdict not None, truth known)
      n_unlabelled           verdict None (e.g. a judge reply that could not be parsed) or
                             an index outside the solution
      n_no_truth             ids missing from `truth` or whose truth is None (empty solutions)
      first_error_accuracy   share of the n whose first error equals the truth
      earlier, later         shares of the n whose first error is before / after the truth
                             (-1 counts as after every step)
      false_correct          share of truly wrong solutions the source calls all correct
      false_error            share of truly correct solutions the source says are wrong
      n_steps                labelled steps;  step_accuracy over them
      step_precision/recall/f1     for "step is wrong";  correct_precision/recall/f1 for "step is correct"
    Shares over zero items are NaN (write them as null).
    """
    n = n_unlabelled = n_no_truth = 0
    same = earlier = later = 0
    n_wrong = n_right = false_correct = false_error = 0
    tp = fp = fn = tn = 0  # positive class = "step is wrong"
    for rec in records:
        pred = source_first_error(rec, source)
        t = truth.get(rec.get("id"))
        if t is None:
            n_no_truth += 1
            continue
        n_steps = len(rec["labels"]) if source == "labels" else len(rec["steps"])
        if pred is None or not -1 <= pred < n_steps:  # no verdict, or an index outside the solution
            n_unlabelled += 1
            continue
        n += 1
        same += pred == t
        rank = lambda k: math.inf if k < 0 else k  # noqa: E731  (-1 = no error = after every step)
        earlier += rank(pred) < rank(t)
        later += rank(pred) > rank(t)
        if t >= 0:
            n_wrong += 1
            false_correct += pred < 0
        else:
            n_right += 1
            false_error += pred >= 0
        for i, pred_ok in enumerate(implied_step_labels(pred, n_steps)):
            true_ok = t < 0 or i < t
            tp += (not pred_ok) and (not true_ok)
            fp += (not pred_ok) and true_ok
            fn += pred_ok and (not true_ok)
            tn += pred_ok and true_ok
    share = lambda k, d: k / d if d else math.nan  # noqa: E731
    p, r, f = _prf(tp, fp, fn)
    cp, cr, cf = _prf(tn, fn, fp)
    return {"n": n, "n_unlabelled": n_unlabelled, "n_no_truth": n_no_truth,
            "first_error_accuracy": share(same, n), "earlier": share(earlier, n), "later": share(later, n),
            "false_correct": share(false_correct, n_wrong), "false_error": share(false_error, n_right),
            "n_steps": tp + fp + fn + tn, "step_accuracy": share(tp + tn, tp + fp + fn + tn),
            "step_precision": p, "step_recall": r, "step_f1": f,
            "correct_precision": cp, "correct_recall": cr, "correct_f1": cf}


# ---------------------------------------------------------------- ProcessBench-style scores

def outcome_baseline(record: Mapping[str, Any]) -> int:
    """The outcome-only predictor: -1 if the final answer is right, else the last step is blamed.
    (Every constant predictor scores F1 0, so this is the least baseline worth beating.)"""
    return -1 if record["final_answer_correct"] else len(record["steps"]) - 1


def processbench_f1(labels: Sequence[int], preds: Sequence[int]) -> dict[str, Any]:
    """acc_error (exact first error on erroneous samples), acc_correct (-1 on correct ones), f1
    (their harmonic mean), n_error, n_correct — prm_jax.evaluation.metrics' definition."""
    return subset_metrics(list(labels), list(preds)).to_json()


def baseline_f1(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """ProcessBench scores of the outcome-only predictor on ProcessBench-style records
    ({"steps", "final_answer_correct", "label"})."""
    records = list(records)
    return processbench_f1([r["label"] for r in records], [outcome_baseline(r) for r in records])


def blind_f1(dev: Sequence[Mapping[str, Any]], test: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The content-blind reference: the best a predictor can do that never reads a solution. It
    flags step k of a random share p of them; k and p are picked, as the PRMs' thresholds are, for
    the best F1 on `dev`, and its expected accuracies on `test` are p * (share of test errors at
    step k) and 1 - p. A PRM at or below it has learned the position of errors, not to find them."""
    def errors_at(records: Sequence[Mapping[str, Any]]) -> list[float]:  # share of errors at each step
        errs = [r["label"] for r in records if r["label"] >= 0]
        return [sum(e == k for e in errs) / len(errs) if errs else 0.0 for k in range(n_steps)]

    n_steps = max((len(r["steps"]) for r in dev), default=1)
    dev_share, test_share = errors_at(dev), errors_at(test)
    k, p = max(((k, p / 100) for k in range(n_steps) for p in range(101)),
               key=lambda kp: harmonic_mean(kp[1] * dev_share[kp[0]], 1 - kp[1]))
    acc_error, acc_correct = p * test_share[k], 1 - p
    return {"step": k, "share_flagged": p, "acc_error": acc_error, "acc_correct": acc_correct,
            "f1": harmonic_mean(acc_error, acc_correct)}


def clean_nan(obj: Any) -> Any:
    """A copy with NaN floats as None, so the result is valid JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: clean_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_nan(v) for v in obj]
    return obj


def simulated_judge(solutions: list[dict], error_rate: float, seed: int) -> list[dict]:
    """The truth with injected mistakes: with probability `error_rate` the verdict is moved to
    another step (or to "no error"). Labelled "simulated" in the records and the report."""
    rng = random.Random(seed)
    out = []
    for sol in solutions:
        truth = check_steps(sol, sol["steps"]).first_error
        verdict = truth
        if truth is not None and rng.random() < error_rate:
            verdict = rng.choice([k for k in range(-1, len(sol["steps"])) if k != truth] or [truth])
        out.append({**sol, "judge": {"first_error": verdict, "model": f"simulated(error_rate={error_rate})",
                                     "raw": ""}})
    return out
