"""Best-of-N: rank N sampled solutions per problem by the PRM, against majority vote and pass@N.

Responses are solution records from `prm-jax sample` (`{"id", "problem", "answer", "steps",
"final_answer", ...}`). Grouping into problems: a `problem_id` field when present, else the id
without its last "-<k>" suffix (sample writes "<problem id>-<k>"), else the problem text. Within a
problem, responses are ordered by k (file order when there is no numeric suffix), and prm@N,
maj@N and pass@N use the FIRST N responses of each problem (deterministic; no averaging over
random subsets), for N = 1, 2, 4, ... up to the smallest group size (which is added when it is
not a power of two).

- pass@N: any of the N is correct.
- maj@N: the most frequent final answer wins (ties: the answer seen first). Answers equivalent
  to the gold (by the project's grader) form one vote; other answers vote by their normalised
  string (so two differently written wrong answers may split their votes).
- prm@N: the response with the highest aggregated score (ties: the earliest; a response with no
  scored step ranks below all scored ones).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Sequence

from prm_jax.data.steps import join_steps
from prm_jax.errors import InputError
from prm_jax.evaluation import metrics
from prm_jax.grading import extract_answer
from prm_jax.evaluation.scoring import holding_out_dir
from prm_jax.records import RecordError, iter_lines, read_jsonl

log = logging.getLogger(__name__)

_SUFFIX = re.compile(r"^(.*)-(\d+)$")


@dataclasses.dataclass(frozen=True)
class Response:
    id: str
    group: str
    k: int | None  # sample index within its problem, from the id suffix
    problem: str
    answer: str  # gold
    steps: tuple[str, ...]
    final_answer: str | None


def group_of(record: dict) -> tuple[str, int | None]:
    """(problem key, sample index) of a solution record; see the module docstring."""
    m = _SUFFIX.match(str(record["id"]))
    k = int(m.group(2)) if m else None
    if record.get("problem_id") is not None:
        return str(record["problem_id"]), k
    if m:
        return m.group(1), k
    return "problem:" + record["problem"], None


def load_responses(path: str) -> list[Response]:
    out, seen = [], set()
    for line in iter_lines(path):
        rid = str(line.get("id", (str, int)))
        if rid in seen:
            raise RecordError(f"{line.where()}: duplicate id {rid!r}")
        seen.add(rid)
        steps = line.get("steps", list)
        if not all(isinstance(s, str) for s in steps):
            raise RecordError(f"{line.where()}: key 'steps' should be a list of strings")
        problem, answer = line.get("problem", str), line.get("answer", (str, int, float))
        if "final_answer" in line.record:
            final = line.get("final_answer", (str, int, float, type(None)))
        else:  # not extracted by the sampler: extract from the solution text
            final = extract_answer(join_steps(steps))
        group, k = group_of(line.record)
        out.append(Response(rid, group, k, problem, str(answer), tuple(steps),
                            None if final is None else str(final)))
    return out


def group_responses(responses: Sequence[Response]) -> dict[str, list[int]]:
    """Problem key -> indices of its responses, ordered by sample index (stable); problems in
    order of first appearance. The gold answer must agree within a problem."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(responses):
        groups.setdefault(r.group, []).append(i)
    for key, idx in groups.items():
        golds = {responses[i].answer for i in idx}
        if len(golds) > 1:
            raise InputError(f"problem {key!r}: its responses disagree on the gold answer ({sorted(golds)[:3]})")
        idx.sort(key=lambda i: (responses[i].k is None, responses[i].k or 0))
    return groups


def n_values(max_n: int) -> list[int]:
    ns, n = [], 1
    while n <= max_n:
        ns.append(n)
        n *= 2
    if ns and ns[-1] != max_n:
        ns.append(max_n)
    return ns


def majority_pick(votes: Sequence[str | None]) -> int:
    """Index of a response carrying the most frequent vote (ties: the vote seen first); -1 if no vote."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, v in enumerate(votes):
        if v is None:
            continue
        counts[v] = counts.get(v, 0) + 1
        first.setdefault(v, i)
    if not counts:
        return -1
    best = max(counts, key=lambda v: (counts[v], -first[v]))
    return first[best]


def bon_curve(groups: Sequence[dict], ns: Sequence[int]) -> list[dict]:
    """groups: [{"correct": [bool], "votes": [str|None], "scores": [float|None]}] (response order).
    Returns [{"n", "prm", "maj", "pass"}] accuracies over problems."""
    curve = []
    for n in ns:
        prm = maj = pas = 0
        for g in groups:
            correct = g["correct"][:n]
            prm += correct[metrics.argmax_first(g["scores"][:n])]
            m = majority_pick(g["votes"][:n])
            maj += m >= 0 and correct[m]
            pas += any(correct)
        k = len(groups)
        curve.append({"n": n, "prm": prm / k, "maj": maj / k, "pass": pas / k})
    return curve


@holding_out_dir
def run_bon(scorer, responses_path: str, out_dir: str, agg: str = "product", plots: bool = True,
            show_progress: bool = True) -> dict:
    """Score every response (OUT/scores.jsonl, resumable), grade, and write OUT/bon_summary.json
    and the plots; return the summary. `scorer` is a `PRMScorer`."""
    import jax

    from prm_jax.evaluation.scoring import open_resumable_scores, score_into
    from prm_jax.grading import grade_many, normalize_answer

    if agg not in metrics.AGGREGATIONS:
        raise InputError(f"--agg {agg!r}: expected one of {', '.join(metrics.AGGREGATIONS)}")
    responses = load_responses(responses_path)
    if not responses:
        raise InputError(f"{responses_path}: no responses")
    groups = group_responses(responses)
    main_host = jax.process_index() == 0
    scores_path = os.path.join(out_dir, "scores.jsonl")
    writer, todo = open_resumable_scores(scorer, out_dir, "scores.jsonl", "id", responses, lambda r: r.id)
    scoring = score_into(scorer, writer, todo, lambda r, scores: {"id": r.id, "problem_key": r.group,
                                                                "n_steps": len(r.steps), "step_scores": scores},
                         "bon", "response", show_progress)
    if not main_host:
        return {}
    scored = {r["id"]: r["step_scores"] for r in read_jsonl(scores_path)}
    step_scores = [scored[r.id] for r in responses]

    correct = grade_many([r.final_answer for r in responses], [r.answer for r in responses])
    votes = [None if r.final_answer is None else ("<gold>" if ok else "ans:" + normalize_answer(r.final_answer))
             for r, ok in zip(responses, correct)]
    sizes = [len(idx) for idx in groups.values()]
    max_n = min(sizes)
    if max(sizes) != max_n:
        log.warning("problems have %d to %d responses; N goes up to %d", max_n, max(sizes), max_n)
        print(f"warning: problems have {max_n} to {max(sizes)} responses; N goes up to {max_n}")
    ns = n_values(max_n)

    def curve_for(how):
        per_group = [{"correct": [correct[i] for i in idx], "votes": [votes[i] for i in idx],
                      "scores": [metrics.aggregate(step_scores[i], how) for i in idx]} for idx in groups.values()]
        return bon_curve(per_group, ns)

    curve = curve_for(agg)
    share, n_full = metrics.min_at_last_share(step_scores, [len(r.steps) for r in responses])
    summary = {
        "agg": agg, "n_problems": len(groups), "n_responses": len(responses), "max_n": max_n,
        "selection": "first N responses of each problem",
        "curve": curve,
        "prm_at_max_n_by_agg": {how: curve_for(how)[-1]["prm"] for how in metrics.AGGREGATIONS},
        "response_accuracy": sum(correct) / len(correct),
        "min_score_at_last_step": {"share": None if math.isnan(share) else share, "n": n_full},
        "unscored_responses": sum(not s for s in step_scores),
        "truncated_responses": sum(len(s) < len(r.steps) for s, r in zip(step_scores, responses)),
        "scoring": scoring,  # this run's padding share, tokens and timings
    }
    with open(os.path.join(out_dir, "bon_summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    if plots:
        from prm_jax.evaluation import plots as plots_mod
        plots_mod.plot_bon(curve, os.path.join(out_dir, "bon_curve.png"), agg)
        plots_mod.plot_min_position([s for s, r in zip(step_scores, responses) if s and len(s) == len(r.steps)],
                                    os.path.join(out_dir, "min_position.png"),
                                    title="Best-of-N responses: where the lowest step score falls")
    print(format_bon(summary))
    return summary


def format_bon(summary: dict) -> str:
    lines = [f"Best-of-N over {summary['n_problems']} problems ({summary['selection']}), agg={summary['agg']}",
             f"{'N':>5}{'prm@N%':>9}{'maj@N%':>9}{'pass@N%':>9}"]
    for c in summary["curve"]:
        lines.append(f"{c['n']:>5}{100 * c['prm']:>9.1f}{100 * c['maj']:>9.1f}{100 * c['pass']:>9.1f}")
    by = "  ".join(f"{k}={100 * v:.1f}" for k, v in summary["prm_at_max_n_by_agg"].items())
    lines.append(f"prm@{summary['max_n']} by aggregation: {by}")
    m = summary["min_score_at_last_step"]
    share = "-" if m["share"] is None else f"{100 * m['share']:.1f}%"
    lines.append(f"lowest step score on the final step: {share} of {m['n']} fully scored responses")
    return "\n".join(lines)
