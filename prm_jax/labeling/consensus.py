"""Consensus filtering: keep a solution only where MC estimation and the LLM judge agree.

A solution is kept iff its MC first error equals the judge's first error (both -1, "no wrong
step", included). A kept solution becomes a training record with the steps up to and including
the first error (later steps say nothing reliable) and hard labels: 1 before the error, 0 at it.

The report counts what was kept and why the rest was dropped (disagreement, a judge verdict that
could not be parsed, an id present in one file only) and compares the two first-error positions:
MC earlier than / same as / later than the judge, where "no error" sits after the last step. The
comparison is also broken down by the judge's position.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prm_jax.records import RecordError, iter_lines

RELATIONS = ("mc_earlier", "same", "mc_later")
DROPPED_KEYS = ("mc", "judge")  # label sources, replaced by `labels` in a training record


def load_labelled(path: str, source: str) -> dict[Any, dict[str, Any]]:
    """Records by id from an MC- (`source="mc"`) or judge-labelled (`"judge"`) file, checked:
    `steps` a list, `<source>.first_error` an int in [-1, len(steps)) or (judge only) null."""
    out: dict[Any, dict[str, Any]] = {}
    for line in iter_lines(path):
        rid = line.get("id", (str, int))
        steps = line.get("steps", list)
        label = line.get(source, dict)
        if "first_error" not in label:
            raise RecordError(f"{line.where()}: key {source!r} lacks 'first_error'")
        fe = label["first_error"]
        if fe is None and source == "mc":
            raise RecordError(f"{line.where()}: mc.first_error is null; expected an int")
        if fe is not None and (isinstance(fe, bool) or not isinstance(fe, int) or not -1 <= fe < len(steps)):
            raise RecordError(f"{line.where()}: {source}.first_error should be -1 or a step index below "
                              f"{len(steps)}, got {fe!r}")
        if rid in out:
            raise RecordError(f"{line.where()}: duplicate id {rid!r}")
        out[rid] = line.record
    return out


def training_record(record: dict[str, Any], first_error: int) -> dict[str, Any]:
    """Steps up to and including the first error with hard labels; other keys kept, mc/judge dropped."""
    steps = record["steps"]
    if first_error == -1:
        kept, labels = list(steps), [1] * len(steps)
    else:
        kept, labels = list(steps[: first_error + 1]), [1] * first_error + [0]
    out = {k: v for k, v in record.items() if k not in DROPPED_KEYS}
    out.update(id=record["id"], problem=record["problem"], steps=kept, labels=labels)
    return out


def relation(mc_first_error: int, judge_first_error: int, n_steps: int) -> str:
    """Where the MC first error sits relative to the judge's ("no error" = position n_steps)."""
    mc = n_steps if mc_first_error == -1 else mc_first_error
    jd = n_steps if judge_first_error == -1 else judge_first_error
    return "same" if mc == jd else ("mc_earlier" if mc < jd else "mc_later")


def consensus_filter(mc: dict[Any, dict[str, Any]], judged: dict[Any, dict[str, Any]]
                     ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(training records, report). Order follows the MC file, then ids only in the judge file."""
    kept: list[dict[str, Any]] = []
    totals = dict.fromkeys(RELATIONS, 0)
    by_position: dict[str, dict[str, int]] = {}
    n_missing = n_unparsed = n_disagree = kept_none = 0
    mismatched_steps = 0
    for rid in list(mc) + [r for r in judged if r not in mc]:
        if rid not in mc or rid not in judged:
            n_missing += 1
            continue
        m, j = mc[rid], judged[rid]
        if m["steps"] != j["steps"]:
            mismatched_steps += 1  # the two labels are about different texts: not comparable
            n_disagree += 1
            continue
        jfe = j["judge"]["first_error"]
        if jfe is None:
            n_unparsed += 1
            continue
        mfe = m["mc"]["first_error"]
        rel = relation(mfe, jfe, len(m["steps"]))
        totals[rel] += 1
        row = by_position.setdefault("none" if jfe == -1 else str(jfe), dict.fromkeys(RELATIONS, 0))
        row[rel] += 1
        if mfe == jfe:
            kept.append(training_record(m, mfe))
            kept_none += mfe == -1
        else:
            n_disagree += 1
    considered = len(set(mc) | set(judged))
    report = {
        "total": considered,
        "kept": len(kept),
        "dropped": considered - len(kept),
        "retention": len(kept) / considered if considered else 0.0,
        "kept_all_correct": kept_none,
        "kept_with_error": len(kept) - kept_none,
        "dropped_disagree": n_disagree,
        "dropped_unparsed": n_unparsed,
        "dropped_missing": n_missing,
        "dropped_step_mismatch": mismatched_steps,
        "agreement": totals,
        "agreement_by_judge_position": dict(sorted(by_position.items(), key=lambda kv: _pos_key(kv[0]))),
    }
    return kept, report


def _pos_key(pos: str) -> tuple[int, int]:
    return (1, 0) if pos == "none" else (0, int(pos))


def format_report(report: dict[str, Any]) -> str:
    """A printable summary and the agreement table (rows: the judge's first error)."""
    lines = [
        f"consensus: kept {report['kept']} of {report['total']} ({100 * report['retention']:.1f}%): "
        f"{report['kept_with_error']} with an error, {report['kept_all_correct']} all correct",
        f"dropped {report['dropped']}: {report['dropped_disagree']} disagree "
        f"({report['dropped_step_mismatch']} of them with different steps), "
        f"{report['dropped_unparsed']} unparsed judge verdict, {report['dropped_missing']} id in one file only",
        "",
        f"{'judge first error':>18} | {'MC earlier':>10} | {'same':>6} | {'MC later':>8} | {'total':>6}",
        "-" * 62,
    ]
    rows: Iterable[tuple[str, dict[str, int]]] = report["agreement_by_judge_position"].items()
    for pos, row in rows:
        lines.append(f"{pos:>18} | {row['mc_earlier']:>10} | {row['same']:>6} | {row['mc_later']:>8} | "
                     f"{sum(row.values()):>6}")
    t = report["agreement"]
    lines.append("-" * 62)
    lines.append(f"{'all':>18} | {t['mc_earlier']:>10} | {t['same']:>6} | {t['mc_later']:>8} | {sum(t.values()):>6}")
    return "\n".join(lines)
