"""Pure metric functions of the evaluation: ProcessBench first-error F1, threshold tuning, step
score aggregation and where the minimum step score falls. No JAX, no I/O: easy to test by hand.

Conventions:
- step scores are P(step correct); a list may be shorter than the steps when truncation cut the
  later steps (they have no score and are never predicted as the error);
- predicted earliest error = first scored step whose score is below the threshold, -1 if none;
- accuracies are fractions in [0, 1]; an accuracy over zero samples is NaN, and so is an F1 built
  on it (written as null in JSON).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

Scores = Sequence[float]


def first_error(scores: Scores, threshold: float) -> int:
    """Index of the first step scored below `threshold`, -1 if none."""
    for i, s in enumerate(scores):
        if s < threshold:
            return i
    return -1


@dataclasses.dataclass(frozen=True)
class SubsetMetrics:
    acc_error: float  # exact-match accuracy of the first-error index on samples with an error (label >= 0)
    acc_correct: float  # accuracy on samples without error (label == -1): pred must be -1
    f1: float  # harmonic mean of the two
    n_error: int
    n_correct: int

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in dataclasses.asdict(self).items()}


def harmonic_mean(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def subset_metrics(labels: Sequence[int], preds: Sequence[int]) -> SubsetMetrics:
    if len(labels) != len(preds):
        raise ValueError(f"{len(labels)} labels but {len(preds)} predictions")
    err = [p == y for y, p in zip(labels, preds) if y >= 0]
    cor = [p == -1 for y, p in zip(labels, preds) if y < 0]
    acc_error = sum(err) / len(err) if err else math.nan
    acc_correct = sum(cor) / len(cor) if cor else math.nan
    return SubsetMetrics(acc_error, acc_correct, harmonic_mean(acc_error, acc_correct), len(err), len(cor))


def average_f1(f1s: Sequence[float]) -> float:
    """The paper's average: unweighted mean over subsets."""
    return float(np.mean(f1s)) if len(f1s) else math.nan


def preds_at(scores: Sequence[Scores], thresholds: np.ndarray) -> np.ndarray:
    """Predicted first errors [len(thresholds), len(scores)] for many thresholds at once.

    With m the running minimum of a sample's scores (non-increasing), the first step below t is
    the number of running minima >= t; if all n are >= t there is none (-1)."""
    thresholds = np.asarray(thresholds, np.float64)
    out = np.empty((len(thresholds), len(scores)), np.int64)
    for j, s in enumerate(scores):
        if len(s) == 0:
            out[:, j] = -1
            continue
        m = np.minimum.accumulate(np.asarray(s, np.float64))
        count = (m[None, :] >= thresholds[:, None]).sum(axis=1)
        out[:, j] = np.where(count == len(s), -1, count)
    return out


def tune_threshold(scores: Sequence[Scores], labels: Sequence[int]) -> tuple[float, float]:
    """The threshold with the best F1 on these samples, and that F1.

    Only the order of the threshold among the observed scores matters, so the candidates are the
    midpoints between consecutive distinct scores plus one below and one above all of them (the
    midpoint generalises better than an observed score). Ties go to the candidate nearest 0.5."""
    values = np.unique(np.concatenate([np.asarray(s, np.float64) for s in scores if len(s)] or [np.zeros(0)]))
    if values.size == 0:
        return 0.5, subset_metrics(labels, [-1] * len(labels)).f1
    cands = np.concatenate([[values[0] / 2], (values[1:] + values[:-1]) / 2, [(values[-1] + 1) / 2]])
    preds = preds_at(scores, cands)
    labels_arr = np.asarray(labels)
    err, cor = labels_arr >= 0, labels_arr < 0
    acc_e = (preds[:, err] == labels_arr[err]).mean(axis=1) if err.any() else np.full(len(cands), np.nan)
    acc_c = (preds[:, cor] == -1).mean(axis=1) if cor.any() else np.full(len(cands), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(acc_e + acc_c > 0, 2 * acc_e * acc_c / (acc_e + acc_c), 0.0)
    f1 = np.nan_to_num(f1, nan=-1.0)
    best = np.flatnonzero(f1 == f1.max())
    k = best[np.argmin(np.abs(cands[best] - 0.5))]
    return float(cands[k]), float(f1[k])


# -- aggregation of a response's step scores (Best-of-N) --------------------------------------

AGGREGATIONS = ("product", "min", "last", "mean")


def aggregate(scores: Scores, how: str = "product") -> float | None:
    """One score for a whole response; None when no step was scored (ranked below every scored one)."""
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation {how!r}: expected one of {', '.join(AGGREGATIONS)}")
    if len(scores) == 0:
        return None
    s = np.asarray(scores, np.float64)
    if how == "product":
        return float(np.prod(s))
    if how == "min":
        return float(s.min())
    if how == "last":
        return float(s[-1])
    return float(s.mean())


def argmax_first(values: Sequence[float | None]) -> int:
    """Index of the largest value, the first on ties; None ranks below any number. -1 if empty."""
    best, best_v = -1, None
    for i, v in enumerate(values):
        if best < 0 or (v is not None and (best_v is None or v > best_v)):
            best, best_v = i, v
    return best


def min_position(scores: Scores) -> tuple[int, float] | None:
    """(index of the lowest step score, its relative position in [0, 1]); ties go to the earliest
    step; a single step is at relative position 1 (it is the final step). None when unscored."""
    if len(scores) == 0:
        return None
    i = int(np.argmin(np.asarray(scores, np.float64)))
    n = len(scores)
    return i, (i / (n - 1) if n > 1 else 1.0)


def min_at_last_share(all_scores: Sequence[Scores], n_steps: Sequence[int] | None = None) -> tuple[float, int]:
    """Share of responses whose lowest step score is on the final step, over the responses whose
    every step was scored (truncated ones cannot say where their final step stands); and that count."""
    hits, n = 0, 0
    for j, s in enumerate(all_scores):
        if len(s) == 0 or (n_steps is not None and len(s) < n_steps[j]):
            continue
        n += 1
        hits += min_position(s)[0] == len(s) - 1
    return (hits / n if n else math.nan), n
