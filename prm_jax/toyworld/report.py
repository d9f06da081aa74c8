"""The demo's report: what a finished run measured against the toy world's truth (label quality,
the PRMs on held-out truth, Best-of-N, MC's failure modes, search) and the paper's lessons as claims,
as report.json, report.md, a printed table and plots."""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from prm_jax.evaluation import metrics
from prm_jax.records import read_jsonl
from prm_jax.toyworld import truth as T
from prm_jax.toyworld.failures import mc_failures
from prm_jax.toyworld.world import check_steps


def load_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _world_text(world: dict[str, Any]) -> str:
    """`tiny` (max_start=9, ..., restate=True): the preset and what the size changes in it."""
    changes = ", ".join(f"{k}={v}" for k, v in world.items() if k != "preset")
    return f"`{world['preset']}`" + (f" ({changes})" if changes else "")


def build_report(p: Callable[..., str], *, size: str, world: dict[str, Any], seed: int, judge: str,
                 label_sets: Sequence[str]) -> dict[str, Any]:
    """The report of a finished demo run whose files `p(*parts)` names: label quality, each PRM
    (trained on `label_sets`) on the held-out truth, Best-of-N, MC's failures, search and the claims."""
    solutions = read_jsonl(p("solutions.jsonl"))
    truth = T.true_first_errors(solutions)
    graded = [check_steps(s, s["steps"]) for s in solutions]
    report: dict[str, Any] = {
        "size": size,
        "world": world,
        "seed": seed,
        "judge": judge,
        "policy": {
            "solutions": len(solutions),
            "final_answer_accuracy": sum(bool(v.final_answer_correct) for v in graded) / max(len(graded), 1),
            "process_correct": sum(v.first_error == -1 for v in graded) / max(len(graded), 1),
        },
        "label_quality": {
            "mc": T.label_quality(read_jsonl(p("mc.jsonl")), truth, "mc"),
            "judge": T.label_quality(read_jsonl(p("judge.jsonl")), truth, "judge"),
            "consensus": T.label_quality(read_jsonl(p("train_consensus.jsonl")), truth, "labels"),
        },
        "consensus": load_json(p("consensus_report.json")),
    }
    heldout = load_json(p("heldout", "toy.json"))
    base = T.baseline_f1(heldout)
    blind = T.blind_f1(load_json(p("heldout", "dev.json")), heldout)
    prm: dict[str, Any] = {"n_heldout": len(heldout), "baseline_f1": base["f1"], "baseline": base,
                           "blind_f1": blind["f1"], "blind": blind}
    bon: dict[str, Any] = {}
    for ls in label_sets:
        summary = load_json(p(f"eval_{ls}", "summary.json"))
        rows = [r for r in read_jsonl(p(f"eval_{ls}", "predictions.jsonl")) if r["subset"] == "toy"]
        at_half = metrics.subset_metrics([r["label"] for r in rows],
                                         [metrics.first_error(r["step_scores"], 0.5) for r in rows]).f1
        sub = summary["subsets"]["toy"]
        key = "" if ls == "consensus" else f"{ls}_"
        prm[f"{key}f1"] = sub["f1"]
        # the threshold tuned on the dev set, and for comparison the F1 at the untuned 0.5
        prm[f"{key}detail"] = {**sub, "threshold": summary["threshold"], "f1_at_half": at_half}
        b = load_json(p(f"bon_{ls}", "bon_summary.json"))
        bon[ls] = {"curve": b["curve"], "min_score_at_last_step": b["min_score_at_last_step"]}
    prm["beats_baseline"] = bool(prm["f1"] > prm["baseline_f1"])
    report["prm"] = prm
    report["best_of_n"] = bon
    report["mc_failures"] = _mc_failures(p, solutions)
    search_summary = p("search", "search_summary.json")
    if os.path.exists(search_summary):
        report["search"] = {run["strategy"]: {k: run[k] for k in ("n", "beam_width", "agg", "problems", "weighted",
                                                                   "prm_argmax", "majority", "pass", "policy_tokens",
                                                                   "prm_tokens")}
                            for run in load_json(search_summary).values()}
    report["claims"] = claims(report)
    return T.clean_nan(report)


def _mc_failures(p: Callable[..., str], solutions: list[dict]) -> dict[str, Any]:
    """How often, by the truth, MC passed a wrong step (its completer reached the right answer from it:
    a wrong check the answer does not use, or a re-derivation) or failed a right step (a weak completer),
    over every MC-labelled solution and over the ones consensus kept (with consensus's first error)."""
    kept = {r["id"]: T.labels_first_error(r["labels"]) for r in read_jsonl(p("train_consensus.jsonl"))}
    return {"mc": mc_failures(read_jsonl(p("mc.jsonl"))),
            "consensus": mc_failures([s for s in solutions if s["id"] in kept], lambda r: kept[r["id"]])}


def claims(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The paper's lessons as the demo measures them (issue 28's claims a-d): each with its numbers and
    whether it holds on this run."""
    acc = {k: report["label_quality"][k]["first_error_accuracy"] for k in ("mc", "judge", "consensus")}
    prm = report["prm"]
    out = [
        {"id": "a", "claim": "consensus labels match the truth more often than MC labels and than judge labels",
         "numbers": {"consensus": acc["consensus"], "mc": acc["mc"], "judge": acc["judge"]},
         "holds": _gt(acc["consensus"], acc["mc"]) and _gt(acc["consensus"], acc["judge"])},
        {"id": "b", "claim": "the consensus PRM beats the content-blind reference and the outcome-only baseline",
         "numbers": {"consensus_prm": prm["f1"], "blind": prm["blind_f1"], "baseline": prm["baseline_f1"]},
         "holds": _gt(prm["f1"], prm["blind_f1"]) and _gt(prm["f1"], prm["baseline_f1"])},
        {"id": "c", "claim": "the consensus PRM beats the MC-only PRM",
         "numbers": {"consensus_prm": prm["f1"], "mc_prm": prm["mc_f1"]}, "holds": _gt(prm["f1"], prm["mc_f1"])},
    ]
    search = report.get("search") or {}
    if "best-of-n" in search:
        bon, beam = search["best-of-n"], search.get("beam")
        numbers = {"n": bon["n"], "weighted_bon": bon["weighted"], "majority": bon["majority"]}
        holds = _gt(bon["weighted"], bon["majority"])
        if beam:
            numbers["beam"] = beam["weighted"]
            holds = holds and _gt(beam["weighted"], bon["majority"])
        out.append({"id": "d", "claim": "PRM-weighted best-of-N and beam search beat majority vote at the same N",
                    "numbers": numbers, "holds": holds})
    return out


def _gt(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and a > b


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{100 * x:.1f}" if pct else f"{x:.3f}"
    return str(x)


def summary_table(report: dict[str, Any]) -> str:
    lq = report["label_quality"]
    lines = [f"Label quality against the truth (judge: {report['judge']})",
             f"{'source':<10}{'n':>6}{'first-err acc%':>16}{'step P%':>9}{'step R%':>9}"]
    for src in ("mc", "judge", "consensus"):
        q = lq[src]
        lines.append(f"{src:<10}{q['n']:>6}{_fmt(q['first_error_accuracy'], True):>16}"
                     f"{_fmt(q['step_precision'], True):>9}{_fmt(q['step_recall'], True):>9}")
    prm = report["prm"]
    lines += ["", f"Held-out, ProcessBench-style ({prm['n_heldout']} solutions; each PRM's threshold tuned on the "
                  "dev set)", f"{'':<36}{'F1%':>8}{'error acc%':>12}{'correct acc%':>14}{'threshold':>11}"
              f"{'F1% at 0.5':>12}"]
    for name, f1, detail in (("PRM trained on consensus labels", "f1", "detail"),
                             ("PRM trained on MC labels", "mc_f1", "mc_detail"),
                             ("PRM trained on judge labels", "judge_f1", "judge_detail"),
                             ("outcome-only baseline", "baseline_f1", "baseline"),
                             ("content-blind reference", "blind_f1", "blind")):
        d = prm[detail]
        tuned = f"{d['threshold']:>11.4f}{_fmt(d['f1_at_half'], True):>12}" if "threshold" in d else ""
        lines.append(f"{name:<36}{_fmt(prm[f1], True):>8}{_fmt(d['acc_error'], True):>12}"
                     f"{_fmt(d['acc_correct'], True):>14}{tuned}")
    curve = report["best_of_n"]["consensus"]["curve"]
    lines += ["", "Best-of-N (consensus PRM)", f"{'N':>4}{'prm@N%':>9}{'maj@N%':>9}{'pass@N%':>9}"]
    for c in curve:
        lines.append(f"{c['n']:>4}{_fmt(c['prm'], True):>9}{_fmt(c['maj'], True):>9}{_fmt(c['pass'], True):>9}")
    search = report.get("search") or {}
    if search:
        lines += ["", f"Search with the consensus PRM ({next(iter(search.values()))['problems']} held-out problems)",
                  f"{'strategy':<12}{'N':>4}{'weighted%':>11}{'PRM argmax%':>13}{'majority%':>11}{'pass@N%':>9}"
                  f"{'policy tok':>12}"]
        for name, r in search.items():
            lines.append(f"{name:<12}{r['n']:>4}{_fmt(r['weighted'], True):>11}{_fmt(r['prm_argmax'], True):>13}"
                         f"{_fmt(r['majority'], True):>11}{_fmt(r['pass'], True):>9}{r['policy_tokens']:>12.0f}")
    fails = report.get("mc_failures")
    if fails:
        lines += ["", "MC's failure modes, counted from the truth (solutions)",
                  f"{'labels':<11}{'n':>6}{'agree':>7}{'passed: unused':>16}{'re-derived':>12}{'right failed':>14}"]
        for name, f in fails.items():
            w = f["wrong_step_passed"]
            lines.append(f"{name:<11}{f['n']:>6}{f['agree']:>7}{w['unused_quantity']:>16}{w['rederived']:>12}"
                         f"{f['right_step_failed']:>14}")
    return "\n".join(lines)


def write_markdown(report: dict[str, Any], path: str) -> None:
    pol, cons = report["policy"], report["consensus"]
    text = [
        "# prm-jax demo report", "",
        f"Demo size `{report['size']}`, seed {report['seed']}; toy world {_world_text(report['world'])}; "
        f"judge: {report['judge']}.", "",
        f"The policy wrote {pol['solutions']} solutions: {_fmt(pol['final_answer_accuracy'], True)}% reach the "
        f"right answer, {_fmt(pol['process_correct'], True)}% are right at every step.", "",
        f"Consensus kept {cons.get('kept')} of {cons.get('kept', 0) + cons.get('dropped', 0)} solutions "
        f"(retention {_fmt(cons.get('retention'), True)}%).", "",
        "```", summary_table(report), "```", "",
        *_claims_markdown(report),
        *_failures_markdown(report),
        *_judge_markdown(report),
        "![label quality](report_label_quality.png)", "", "![PRM F1](report_f1.png)", "",
        "![Best-of-N](bon_consensus/bon_curve.png)", "",
        *(["![search](search/search_accuracy.png)", ""] if report.get("search") else []),
        "Held-out scores: error acc is the share of erroneous solutions whose first error is found exactly, "
        "correct acc the share of correct solutions left unflagged; F1 is their harmonic mean (ProcessBench's). "
        "A PRM calls a step wrong when its score falls below its threshold, the one with the best F1 on the dev "
        "set (fresh policy samples on other problems), as ProcessBench's PRM evaluations pick theirs on GSM8K.", "",
        "Step precision/recall: the positive class is \"this step is wrong\", over the steps each source labels "
        "(the steps up to its first error). The outcome-only baseline knows whether the final answer is right and "
        "then blames the last step. The content-blind reference never reads a solution: it flags one step of a "
        "random share of them (which step and what share picked on the dev set; expected accuracies shown). A PRM "
        "at or below it has learned where errors tend to be, not to find them.",
    ]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(text) + "\n")


def _judge_markdown(report: dict[str, Any]) -> list[str]:
    how = {
        "rederive": "The critic (a model trained to solve the problems, larger than the policy at the small size) "
                    "judges by re-deriving each step: for step k it writes the step it would take after the "
                    "solution's steps before k, never seeing step k itself, and step k is wrong where the "
                    "two computations differ (a check or restart is redone from its lead-in). ",
        "critic": "The critic judges by a generative check: for each paragraph in turn it first writes what the "
                  "step should compute (`Paragraph 1: expected 12 - 3 = 9; wrong operation, incorrect.`, a check "
                  "step's inverse, a restart's first operation), then its verdict, and stops at the first wrong "
                  "one. ",
    }.get(report["judge"])
    if how is None:
        return []
    judge = report["label_quality"]["judge"]
    return [how + f"Its first-error accuracy is {_fmt(judge['first_error_accuracy'], True)}% and its step recall "
                  f"(wrong steps it calls wrong) {_fmt(judge['step_recall'], True)}% (the judge row above).", ""]


def _claims_markdown(report: dict[str, Any]) -> list[str]:
    """The paper's lessons as this run measured them, each plainly marked where it does not hold."""
    lines = ["## The paper's lessons on this run", ""]
    for c in report.get("claims", []):
        nums = ", ".join(f"{k} {v if k == 'n' else _fmt(v, True)}" for k, v in c["numbers"].items())
        lines.append(f"- ({c['id']}) {c['claim']}: **{'holds' if c['holds'] else 'does not hold'}** ({nums}).")
    return lines + ["", "Percentages: label first-error accuracy, held-out PRM F1, search accuracy. Across seeds: "
                        "`experiments/demo_seeds.py` prints these claims per seed.", ""]


def _failures_markdown(report: dict[str, Any]) -> list[str]:
    fails = report.get("mc_failures")
    if not fails:
        return []
    world = report["world"]
    f = fails["mc"]
    w = f["wrong_step_passed"]
    return [
        "## MC's failure modes, counted from the truth", "",
        f"World shares: restart after an early error {world.get('restart_rate', 0.0)}, check steps "
        f"{world.get('check_rate', 0.0)}, last-step slips {world.get('slip_rate', 0.0)} (of the policy's and the "
        f"critic's training solutions). Of the {f['n']} MC-labelled solutions ({f['solutions_restarting']} restart "
        f"after a step, {f['solutions_with_check']} carry a check), MC's first error equals the truth on "
        f"{f['agree']}; MC passed the true first error on {w['unused_quantity'] + w['rederived']} (a rollout reached "
        f"the right answer from the wrong step: {w['unused_quantity']} wrong checks, a quantity the answer does not "
        f"use, and {w['rederived']} steps the completer re-derived past) and blamed a right step on "
        f"{f['right_step_failed']} (every rollout failed from it: a weak completer). Among the "
        f"{fails['consensus']['n']} solutions consensus kept: {fails['consensus']['agree']} agree with the truth, "
        f"{sum(fails['consensus']['wrong_step_passed'].values())} passed, "
        f"{fails['consensus']['right_step_failed']} blamed early.", ""]


def _bar_chart(path: str, names: list[str], percents: list[float], colors: list[str], ylabel: str, title: str,
               notes: list[str] | None = None) -> None:
    import matplotlib  # start-up: heavy, and only the plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, percents, color=colors)
    for i, note in enumerate(notes or []):
        ax.text(i, percents[i] + 1, note, ha="center")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 110)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_report(report: dict[str, Any], out: str) -> None:
    lq, prm = report["label_quality"], report["prm"]
    srcs = ["mc", "judge", "consensus"]
    _bar_chart(os.path.join(out, "report_label_quality.png"), srcs,
               [100 * (lq[s]["first_error_accuracy"] or 0) for s in srcs], ["#4c72b0", "#dd8452", "#55a868"],
               "first error matches truth (%)", f"Label quality against the truth (judge: {report['judge']})",
               notes=[f"n={lq[s]['n']}" for s in srcs])
    _bar_chart(os.path.join(out, "report_f1.png"), ["consensus", "MC only", "judge only", "outcome\nbaseline",
                                                     "content-\nblind"],
               [100 * (prm[k] or 0) for k in ("f1", "mc_f1", "judge_f1", "baseline_f1", "blind_f1")],
               ["#55a868", "#4c72b0", "#dd8452", "#999999", "#cccccc"], "held-out first-error F1 (%)",
               f"PRMs by training labels (judge: {report['judge']})")


# -- driver ----------------------------------------------------------------------------------
