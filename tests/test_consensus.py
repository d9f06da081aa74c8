"""Consensus filtering on hand-built cases; expected outputs are worked out by hand below."""
import json

import pytest

from prm_jax import cli
from prm_jax.labeling.consensus import consensus_filter, format_report, load_labelled, relation, training_record
from prm_jax.records import RecordError

STEPS = ["s0", "s1", "s2", "s3"]


def mc(rid, fe, steps=STEPS, **extra):
    return {"id": rid, "problem": f"p{rid}", "steps": list(steps), "mc": {"n": 8, "correct": [], "first_error": fe},
            **extra}


def jd(rid, fe, steps=STEPS):
    return {"id": rid, "problem": f"p{rid}", "steps": list(steps), "judge": {"first_error": fe, "model": "m", "raw": "."}}


# id: (MC first error, judge first error)  ->  by hand: kept?, relation (positions: none = 4)
CASES = {
    "a": (2, 2),      # kept, same
    "b": (-1, -1),    # kept, same (both say no error)
    "c": (0, 0),      # kept, same
    "d": (1, 3),      # dropped, MC earlier
    "e": (3, 1),      # dropped, MC later
    "f": (-1, 2),     # dropped, MC later (none = position 4)
    "g": (2, -1),     # dropped, MC earlier
    "h": (1, None),   # dropped: unparsed verdict
}


def build():
    m = {rid: mc(rid, a, generator="policy") for rid, (a, _) in CASES.items()}
    j = {rid: jd(rid, b) for rid, (_, b) in CASES.items()}
    m["only_mc"] = mc("only_mc", 1)
    j["only_judge"] = jd("only_judge", 1)
    return m, j


def test_filter_keeps_agreement_and_reports_why_others_dropped():
    kept, rep = consensus_filter(*build())
    assert [r["id"] for r in kept] == ["a", "b", "c"]
    assert kept[0] == {"id": "a", "problem": "pa", "steps": ["s0", "s1", "s2"], "labels": [1, 1, 0],
                       "generator": "policy"}
    assert kept[1]["steps"] == STEPS and kept[1]["labels"] == [1, 1, 1, 1]
    assert kept[2]["steps"] == ["s0"] and kept[2]["labels"] == [0]
    assert (rep["total"], rep["kept"], rep["dropped"]) == (10, 3, 7)
    assert rep["retention"] == pytest.approx(0.3)
    assert (rep["dropped_disagree"], rep["dropped_unparsed"], rep["dropped_missing"]) == (4, 1, 2)
    assert (rep["kept_all_correct"], rep["kept_with_error"]) == (1, 2)
    assert rep["agreement"] == {"mc_earlier": 2, "same": 3, "mc_later": 2}
    assert rep["agreement_by_judge_position"] == {
        "0": {"mc_earlier": 0, "same": 1, "mc_later": 0},
        "1": {"mc_earlier": 0, "same": 0, "mc_later": 1},
        "2": {"mc_earlier": 0, "same": 1, "mc_later": 1},
        "3": {"mc_earlier": 1, "same": 0, "mc_later": 0},
        "none": {"mc_earlier": 1, "same": 1, "mc_later": 0},
    }
    table = format_report(rep)
    assert "kept 3 of 10 (30.0%)" in table and "1 unparsed judge verdict" in table
    assert [c.strip() for c in table.splitlines()[-1].split("|")] == ["all", "2", "3", "2", "7"]


def test_relation_positions():
    assert relation(-1, -1, 4) == "same"
    assert relation(3, -1, 4) == "mc_earlier"
    assert relation(-1, 0, 4) == "mc_later"
    assert relation(0, 1, 4) == "mc_earlier"


def test_training_record_drops_label_sources_keeps_other_keys():
    r = training_record({**mc("x", 1), "judge": {"first_error": 1}, "answer": "42"}, 1)
    assert r == {"id": "x", "problem": "px", "steps": ["s0", "s1"], "labels": [1, 0], "answer": "42"}


def test_different_steps_are_not_compared():
    m, j = {"x": mc("x", 1)}, {"x": jd("x", 1, steps=["other", "s1", "s2"])}
    kept, rep = consensus_filter(m, j)
    assert kept == [] and rep["dropped_step_mismatch"] == 1 and rep["dropped_disagree"] == 1


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_cli_filter_writes_records_report_and_table(tmp_path, capsys):
    m, j = build()
    mp, jp = write(tmp_path / "mc.jsonl", m.values()), write(tmp_path / "judge.jsonl", j.values())
    out, rep = tmp_path / "train.jsonl", tmp_path / "report.json"
    assert cli.main(["filter", "--mc", str(mp), "--judge", str(jp), "--out", str(out), "--report", str(rep)]) == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "b", "c"]
    report = json.loads(rep.read_text())
    assert (report["kept"], report["dropped"], report["retention"]) == (3, 7, 0.3)
    printed = capsys.readouterr().out
    assert "judge first error" in printed and "MC earlier" in printed


@pytest.mark.parametrize("record,source,msg", [
    (mc("x", 4), "mc", r"mc\.first_error should be -1 or a step index below 4, got 4"),
    (mc("x", None), "mc", r"mc\.first_error is null"),
    (jd("x", -2), "judge", r"judge\.first_error should be -1"),
    ({"id": "x", "steps": STEPS}, "judge", r"missing key 'judge'"),
    ({"id": "x", "steps": STEPS, "judge": {"model": "m"}}, "judge", r"lacks 'first_error'"),
])
def test_bad_labelled_records_name_file_and_line(tmp_path, record, source, msg):
    p = write(tmp_path / "in.jsonl", [jd("ok", 1) if source == "judge" else mc("ok", 1), record])
    with pytest.raises(RecordError, match=r"in\.jsonl:2: .*" + msg):
        load_labelled(str(p), source)
