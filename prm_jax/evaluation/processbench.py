"""ProcessBench: for each solution, find the earliest wrong step (or say there is none).

Data is read as published (`{subset}.json`, a JSON array of `{"id", "generator", "problem", "steps",
"final_answer_correct", "label"}`, label = index of the first wrong step, -1 if none). Every sample
is scored once (`PRMScorer`); `OUT/predictions.jsonl` receives one row per sample as batches
finish (keyed by `subset/id`, so a rerun on the same OUT skips what is done), and at the end it is
rewritten with the predictions at the final threshold (the tuned one needs every GSM8K score).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence

from prm_jax.errors import InputError, RunError
from prm_jax.evaluation import metrics
from prm_jax.evaluation.scoring import holding_out_dir, open_resumable_scores, score_into
from prm_jax.records import read_jsonl, read_text, write_jsonl

log = logging.getLogger(__name__)

SUBSETS = ("gsm8k", "math", "olympiadbench", "omnimath")
EXPECTED_COUNTS = {"gsm8k": 400, "math": 1000, "olympiadbench": 1000, "omnimath": 1000}
TUNE_SUBSET = "gsm8k"


@dataclasses.dataclass(frozen=True)
class Sample:
    id: str
    subset: str
    problem: str
    steps: tuple[str, ...]
    label: int
    final_answer_correct: bool
    generator: str | None = None

    @property
    def key(self) -> str:
        return f"{self.subset}/{self.id}"


def _check_sample(rec, where: str, subset: str) -> Sample:
    if not isinstance(rec, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}")

    def get(key, kind, what):
        if key not in rec:
            raise InputError(f"{where}: missing key {key!r}")
        v = rec[key]
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise InputError(f"{where}: key {key!r} should be {what}, got {v!r:.60}")
        return v

    sid = get("id", (str, int), "a string")
    steps = get("steps", list, "a list of strings")
    if not all(isinstance(s, str) for s in steps):
        raise InputError(f"{where}: key 'steps' should be a list of strings")
    label = get("label", int, "an int")
    if not -1 <= label < len(steps):
        raise InputError(f"{where}: key 'label' is {label}, expected -1 or a step index below {len(steps)}")
    return Sample(id=str(sid), subset=subset, problem=get("problem", str, "a string"), steps=tuple(steps),
                  label=label, final_answer_correct=bool(get("final_answer_correct", bool, "a bool")),
                  generator=rec.get("generator"))


def balanced_head(samples: list[Sample], limit: int) -> list[Sample]:
    """The first ceil(limit/2) erroneous and first floor(limit/2) correct samples (the published
    files list erroneous samples first, so a plain head would leave acc_correct undefined)."""
    err = [s for s in samples if s.label >= 0][:(limit + 1) // 2]
    cor = [s for s in samples if s.label < 0][:limit // 2]
    keep = {id(s) for s in err + cor}
    return [s for s in samples if id(s) in keep]


def load_subset(data_dir: str, subset: str, limit: int | None = None) -> list[Sample]:
    path = os.path.join(data_dir, f"{subset}.json")
    if not os.path.exists(path):
        raise InputError(f"{path}: ProcessBench subset {subset!r} not found (expected {subset}.json in "
                         f"{data_dir})")
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON array of samples, got {type(data).__name__}")
    samples = [_check_sample(rec, f"{path}: sample {i}", subset) for i, rec in enumerate(data)]
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise InputError(f"{path}: duplicate ids")
    expected = EXPECTED_COUNTS.get(subset)
    if expected is not None and len(samples) != expected:
        log.warning("%s: %d samples, but the published ProcessBench %s has %d", path, len(samples), subset, expected)
        print(f"warning: {path} has {len(samples)} samples; the published {subset} subset has {expected}")
    else:
        log.info("%s: %d samples%s", path, len(samples), " (as published)" if expected else "")
    return balanced_head(samples, limit) if limit else samples


def prediction_row(sample: Sample, scores: list[float], threshold: float | None) -> dict:
    return {"key": sample.key, "id": sample.id, "subset": sample.subset, "label": sample.label,
            "pred": None if threshold is None else metrics.first_error(scores, threshold),
            "threshold": threshold, "final_answer_correct": sample.final_answer_correct,
            "n_steps": len(sample.steps), "step_scores": scores}


def diagnostics(rows: Sequence[dict]) -> dict:
    """The paper's checks beyond F1: on samples whose final answer is right but whose process is
    flawed, how often the PRM points at the right step, or flags any step at all; and where the
    lowest step score falls."""
    flawed = [r for r in rows if r["final_answer_correct"] and r["label"] >= 0]
    n = len(flawed)
    share_min_last, n_full = metrics.min_at_last_share([r["step_scores"] for r in rows], [r["n_steps"] for r in rows])
    nan = lambda x: None if isinstance(x, float) and math.isnan(x) else x  # noqa: E731
    return {
        "flawed_with_correct_answer": {
            "n": n,
            "found_exact": nan(sum(r["pred"] == r["label"] for r in flawed) / n if n else math.nan),
            "flagged_any": nan(sum(r["pred"] >= 0 for r in flawed) / n if n else math.nan),
        },
        "min_score_at_last_step": {"share": nan(share_min_last), "n": n_full},
        "truncated_samples": sum(len(r["step_scores"]) < r["n_steps"] for r in rows),
        "unscored_samples": sum(not r["step_scores"] and r["n_steps"] > 0 for r in rows),
    }


def summarize(rows: Sequence[dict], subsets: Sequence[str], threshold: float, tuned_f1: float | None = None,
              tune_subset: str = TUNE_SUBSET) -> dict:
    tuned = tuned_f1 is not None
    out: dict = {"threshold": threshold, "threshold_mode": f"tuned on {tune_subset}" if tuned else "fixed",
                 "subsets": {}}
    if tuned:
        out["tune_subset"], out["tuned_f1"] = tune_subset, tuned_f1
    f1s, sizes = [], []
    for name in subsets:
        sub = [r for r in rows if r["subset"] == name]
        m = metrics.subset_metrics([r["label"] for r in sub], [r["pred"] for r in sub])
        out["subsets"][name] = m.to_json()
        f1s.append(m.f1)
        sizes.append(len(sub))
    avg = metrics.average_f1(f1s)
    out["average_f1"] = None if math.isnan(avg) else avg
    wavg = sum(f * n for f, n in zip(f1s, sizes)) / sum(sizes) if sum(sizes) else math.nan
    out["weighted_average_f1"] = None if math.isnan(wavg) else wavg  # weighted by subset size: NOT the paper's
    out["diagnostics"] = diagnostics(rows)
    return out


def format_table(summary: dict) -> str:
    pct = lambda v: "   -" if v is None else f"{100 * v:5.1f}"  # noqa: E731
    lines = [f"{'subset':<15}{'n_err':>6}{'n_ok':>6}{'acc_err%':>10}{'acc_ok%':>9}{'F1%':>7}"]
    for name, m in summary["subsets"].items():
        lines.append(f"{name:<15}{m['n_error']:>6}{m['n_correct']:>6}{pct(m['acc_error']):>10}"
                     f"{pct(m['acc_correct']):>9}{pct(m['f1']):>7}")
    lines.append(f"{'average F1 (unweighted mean of subsets, as the paper)':<52} {pct(summary['average_f1'])}")
    lines.append(f"{'weighted average F1 (by subset size)':<52} {pct(summary['weighted_average_f1'])}")
    lines.append(f"threshold {summary['threshold']:.4f} ({summary['threshold_mode']})")
    diag = summary["diagnostics"]
    if diag["truncated_samples"]:
        lines.append(f"truncated: {diag['truncated_samples']} samples lost steps to the max length "
                     f"({diag['unscored_samples']} have no scored step and predict -1)")
    d = diag["flawed_with_correct_answer"]
    lines.append(f"flawed process, correct answer: n={d['n']}  flaw found exactly {pct(d['found_exact'])}%  "
                 f"any step flagged {pct(d['flagged_any'])}%")
    return "\n".join(lines)


@holding_out_dir
def run_processbench(scorer, data_dir: str, out_dir: str, subsets: Sequence[str] = SUBSETS,
                     threshold: float | str = 0.5, limit: int | None = None, plots: bool = True,
                     show_progress: bool = True, tune_subset: str = TUNE_SUBSET) -> dict:
    """Score, predict, write OUT/predictions.jsonl, OUT/summary.json and the plots; return the summary.
    `scorer` is a `PRMScorer`; `threshold` a number or "tune" (the best F1 on `tune_subset`, then
    applied to every subset, as ProcessBench's PRM evaluations pick theirs on GSM8K)."""
    import jax

    tune = threshold == "tune"
    if tune and tune_subset not in subsets:
        raise InputError(f"--threshold tune picks the threshold on {tune_subset}; add it to --subsets")
    if not tune:
        threshold = float(threshold)
    unknown = [s for s in subsets if s not in SUBSETS]
    if unknown:
        log.warning("subsets %s are not part of the published ProcessBench; reading them anyway", unknown)
    samples = [s for name in subsets for s in load_subset(data_dir, name, limit)]
    main_host = jax.process_index() == 0
    pred_path = os.path.join(out_dir, "predictions.jsonl")
    # Every host runs every batch (the forward is one SPMD program); host 0 writes.
    writer, todo = open_resumable_scores(scorer, out_dir, "predictions.jsonl", "key", samples, lambda s: s.key)
    if main_host and len(todo) < len(samples):
        print(f"resuming: {len(samples) - len(todo)} of {len(samples)} samples already scored in {pred_path}")
    scoring = score_into(scorer, writer, todo, lambda s, scores: prediction_row(s, scores, None if tune else threshold),
               "processbench", "sample", show_progress)
    if not main_host:
        return {}

    by_key = {r["key"]: r for r in read_jsonl(pred_path)}
    missing = [s.key for s in samples if s.key not in by_key]
    if missing:
        raise RunError(f"{pred_path}: no row for {len(missing)} samples (first: {missing[0]})")
    rows = [by_key[s.key] for s in samples]
    tuned_f1 = None
    if tune:
        tune_rows = [r for r in rows if r["subset"] == tune_subset]
        threshold, tuned_f1 = metrics.tune_threshold([r["step_scores"] for r in tune_rows],
                                                     [r["label"] for r in tune_rows])
    # Rows of the current run get predictions at the final threshold; the file is rewritten atomically.
    for r in by_key.values():
        r["pred"], r["threshold"] = metrics.first_error(r["step_scores"], threshold), threshold
    write_jsonl(pred_path, by_key.values())

    summary = summarize(rows, subsets, threshold, tuned_f1, tune_subset)
    summary["limit"] = limit
    summary["scoring"] = scoring  # this run's padding share, tokens and timings (nothing scored on a full resume)
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    if plots:
        from prm_jax.evaluation import plots as plots_mod
        plots_mod.plot_f1(summary, os.path.join(out_dir, "f1_per_subset.png"))
        plots_mod.plot_min_position(
            [r["step_scores"] for r in rows if r["step_scores"] and len(r["step_scores"]) == r["n_steps"]],
            os.path.join(out_dir, "min_position.png"), title="ProcessBench: where the lowest step score falls")
    print(format_table(summary))
    return summary
