"""Data formats: round trips on the real samples in ../shared/data, readings checked against the
files' own fields (parsed independently here), and bad input named by file:line."""
import json
import re

import pytest

from prm_jax.data import formats as F
from prm_jax import cli
from prm_jax.records import RecordError


def raw_lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


@pytest.mark.parametrize("fmt,rel", [
    ("gsm8k", "gsm8k/test.jsonl"),
    ("math", "math500/test.jsonl"),
    ("math-shepherd", "math_shepherd/sample_openr_math-shepherd.jsonl"),
])
def test_byte_exact_round_trip(shared_data, tmp_path, fmt, rel):
    src = shared_data / rel
    res = F.read(fmt, src)
    assert res.skipped == [] and len(res.records) == len(raw_lines(src))
    F.write(fmt, tmp_path / "out", res.records)
    assert (tmp_path / "out").read_bytes() == src.read_bytes()


def test_processbench_round_trip(shared_data, tmp_path):
    src = shared_data / "processbench" / "gsm8k.json"
    res = F.read("processbench", src)
    assert len(res.records) == 400
    F.write("processbench", tmp_path / "pb.json", res.records)
    assert json.loads((tmp_path / "pb.json").read_text()) == json.loads(src.read_text())


def test_gsm8k_and_math_problem_records(shared_data):
    g = F.read("gsm8k", shared_data / "gsm8k" / "test.jsonl").records[0]
    assert g["id"] == "gsm8k-0" and g["answer"] == "18" and g["problem"].startswith("Janet")
    assert g["solution"].endswith("$<<9*2=18>>18 every day at the farmer\u2019s market.")
    m = F.read("math", shared_data / "math500" / "test.jsonl").records[0]
    assert m["id"] == "test/precalculus/807.json" and m["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"


def test_math_answer_from_boxed_when_absent(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps({"problem": "x?", "solution": "So $x = \\boxed{\\frac{1}{2}}$."}) + "\n")
    assert F.read("math", p).records[0]["answer"] == "\\frac{1}{2}"


def test_math_shepherd_labels_follow_the_signs(shared_data):
    src = shared_data / "math_shepherd" / "sample_openr_math-shepherd.jsonl"
    for raw, rec in zip(raw_lines(src), F.read("math-shepherd", src).records):
        signs = re.findall(r" ([+-])(?=\nStep \d+:|$)", raw["label"])  # the sign ending each step
        assert rec["labels"] == [1 if s == "+" else 0 for s in signs]
        assert len(rec["steps"]) == raw["input"].count("ки")
        assert raw["input"].startswith(rec["problem"] + " Step 1: " + rec["steps"][0])
        assert rec["task"] == raw["task"]


def test_prm800k_follows_the_chosen_path(shared_data, tmp_path):
    src = shared_data / "prm800k" / "sample_openr_prm800k.jsonl"
    raws, recs = raw_lines(src), F.read("prm800k", src).records
    assert len(recs) == 6
    # Record 2 (finish_reason found_error): 6 chosen steps rated 1, 0, 1, 1, 1, 1 (0 counts as good), then a
    # step with no chosen completion whose only -1 completion ends the solution.
    steps2 = raws[1]["label"]["steps"]
    assert [s["completions"][0]["rating"] for s in steps2[:6]] == [1, 0, 1, 1, 1, 1]
    assert recs[1]["labels"] == [1, 1, 1, 1, 1, 1, 0]
    assert recs[1]["steps"][6] == next(c["text"] for c in steps2[6]["completions"] if c["rating"] == -1)
    assert recs[1]["answer"] == "28800" and recs[1]["finish_reason"] == "found_error"
    # Record 1: step 2's five completions are all rated -1 and none was chosen; the labeler's own step is used.
    assert recs[0]["steps"][1] == raws[0]["label"]["steps"][1]["human_completion"]["text"]
    assert recs[0]["labels"][1] == 1
    # Every record: step texts are the chosen completions where one was chosen.
    for raw, rec in zip(raws, recs):
        for st, text in zip(raw["label"]["steps"], rec["steps"]):
            if st["chosen_completion"] is not None:
                assert text == st["completions"][st["chosen_completion"]]["text"]
        assert rec["problem"] == raw["question"]["problem"]
    F.write("prm800k", tmp_path / "p.jsonl", recs)
    assert F.read("prm800k", tmp_path / "p.jsonl").records == recs


def test_trl_both_ways_and_processbench_to_trl(shared_data, tmp_path):
    pb = F.read("processbench", shared_data / "processbench" / "gsm8k.json").records
    res = F.convert("processbench", "trl", shared_data / "processbench" / "gsm8k.json", tmp_path / "t.jsonl")
    assert res.written == 400 and res.skipped == []
    rows = raw_lines(tmp_path / "t.jsonl")
    for src, row in zip(pb, rows):
        k = src["label"]
        n = len(src["steps"]) if k == -1 else k + 1
        assert row["prompt"] == src["problem"] and row["completions"] == src["steps"][:n]
        assert row["labels"] == [True] * n if k == -1 else row["labels"] == [True] * k + [False]
    back = F.read("trl", tmp_path / "t.jsonl").records
    assert back[0]["id"] == pb[0]["id"] and back[0]["labels"] == [int(v) for v in rows[0]["labels"]]
    F.write("trl", tmp_path / "t2.jsonl", back)
    assert (tmp_path / "t2.jsonl").read_text() == (tmp_path / "t.jsonl").read_text()


def test_math_shepherd_via_records_to_prm800k_and_back(shared_data, tmp_path):
    src = shared_data / "math_shepherd" / "sample_openr_math-shepherd.jsonl"
    F.convert("math-shepherd", "records", src, tmp_path / "r.jsonl")
    F.convert("records", "prm800k", tmp_path / "r.jsonl", tmp_path / "p.jsonl")
    F.convert("prm800k", "math-shepherd", tmp_path / "p.jsonl", tmp_path / "s.jsonl")
    a, b = F.read("math-shepherd", src).records, F.read("math-shepherd", tmp_path / "s.jsonl").records
    assert [(r["problem"], r["steps"], r["labels"]) for r in a] == [(r["problem"], r["steps"], r["labels"]) for r in b]


def test_bad_lines_error_or_are_skipped_and_counted(tmp_path):
    p = tmp_path / "bad.jsonl"
    good = {"prompt": "p", "completions": ["a", "b"], "labels": [True, False]}
    p.write_text("\n".join([json.dumps(good), "{not json", json.dumps({**good, "labels": [True]}),
                            json.dumps([1, 2]), json.dumps(good)]) + "\n")
    with pytest.raises(RecordError, match=r"bad\.jsonl:2: not valid JSON"):
        F.read("trl", p)
    res = F.read("trl", p, skip_bad=True)
    assert len(res.records) == 2 and len(res.skipped) == 3
    assert re.search(r"bad\.jsonl:3: 1 labels for 2 completions", res.skipped[1])
    assert re.search(r"bad\.jsonl:4: expected a JSON object, got list", res.skipped[2])


@pytest.mark.parametrize("fmt,line,msg", [
    ("gsm8k", {"question": "q", "answer": "no marker"}, r"'answer' should end with '#### <final answer>'"),
    ("math-shepherd", {"input": "Q Step 1: a ки", "label": "Q Step 1: a ?"}, r"replaced by '\+' or '-'"),
    ("math-shepherd", {"input": "Q Step 1: a", "label": "Q Step 1: a"}, r"no 'ки' step tag"),
    ("prm800k", {"question": {"problem": "q"}, "label": {"steps": [{"completions": [{"text": "a", "rating": 2}],
                                                                     "chosen_completion": 0}]}},
     r"label\.steps\[0\]: rating should be -1, 0 or 1, got 2"),
    ("records", {"id": 1, "steps": ["a"], "labels": [1, 0]}, r"key 'labels' has 2 labels for 1 steps"),
    ("math", {"problem": "q", "solution": "no box"}, r"no 'answer' and no \\boxed"),
])
def test_format_specific_errors_name_file_and_line(tmp_path, fmt, line, msg):
    p = tmp_path / "in.jsonl"
    p.write_text("\n" + json.dumps(line) + "\n")  # a blank first line: the record is on line 2
    with pytest.raises(RecordError, match=r"in\.jsonl:2: .*" + msg):
        F.read(fmt, p)


def test_processbench_bad_element_names_its_line(tmp_path):
    p = tmp_path / "pb.json"
    ok = {"id": "x-0", "generator": "g", "problem": "p", "steps": ["a", "b"], "final_answer_correct": True, "label": -1}
    bad = {**ok, "id": "x-1", "label": 2}
    p.write_text(json.dumps([ok, bad], indent=2))
    line_of_bad = json.dumps([ok, bad], indent=2).splitlines().index("  {", 2) + 1
    with pytest.raises(RecordError, match=rf"pb\.json:{line_of_bad}: 'label' should be -1 or a step index below 2"):
        F.read("processbench", p)
    assert len(F.read("processbench", p, skip_bad=True).records) == 1
    p.write_text('[{"id": "x"},\n {"id": ')  # a broken array cannot be skipped past
    with pytest.raises(RecordError, match=r"pb\.json:2: not valid JSON"):
        F.read("processbench", p, skip_bad=True)


def test_cli_convert_skip_bad(tmp_path, capsys):
    p = tmp_path / "in.jsonl"
    p.write_text('{"question": "q", "answer": "s\\n#### 4"}\n{"question": "q2"}\n')
    assert cli.main(["convert", "--from", "gsm8k", "--to", "records", str(p), str(tmp_path / "o.jsonl")]) == 2
    assert capsys.readouterr().err == f"prm-jax convert: error: {p}:2: missing key 'answer'\n"
    assert cli.main(["convert", "--from", "gsm8k", "--to", "records", "--skip-bad", str(p),
                          str(tmp_path / "o.jsonl")]) == 0
    out = capsys.readouterr()
    assert "1 records written, 1 skipped" in out.out and "in.jsonl:2" in out.err
    assert raw_lines(tmp_path / "o.jsonl") == [{"id": "gsm8k-0", "problem": "q", "answer": "4", "solution": "s"}]
    with pytest.raises(ValueError, match="problem format"):
        F.convert("trl", "gsm8k", p, tmp_path / "x")


def test_math_shepherd_to_trl_and_back_keeps_task_and_unknown_keys(shared_data, tmp_path):
    src = shared_data / "math_shepherd" / "sample_openr_math-shepherd.jsonl"
    raw = raw_lines(src)
    F.convert("math-shepherd", "trl", src, tmp_path / "t.jsonl")
    rows = raw_lines(tmp_path / "t.jsonl")
    assert [r["task"] for r in rows] == [r["task"] for r in raw]  # TRL's table carries the column
    res = F.convert("trl", "math-shepherd", tmp_path / "t.jsonl", tmp_path / "s.jsonl")
    assert res.dropped == {"id": len(raw)}  # Math-Shepherd has no id field, and says so
    assert raw_lines(tmp_path / "s.jsonl") == raw
    # a key no reader knows rides along into open formats and is reported where a schema has no field
    (tmp_path / "x.jsonl").write_text(json.dumps({**raw[0], "source": "openr"}) + "\n")
    F.convert("math-shepherd", "records", tmp_path / "x.jsonl", tmp_path / "r.jsonl")
    assert raw_lines(tmp_path / "r.jsonl")[0]["source"] == "openr"
    res = F.convert("records", "processbench", tmp_path / "r.jsonl", tmp_path / "pb.json")
    assert res.dropped == {"task": 1, "source": 1}


def test_cli_convert_names_dropped_keys_and_the_input_line_of_an_unwritable_record(tmp_path, capsys):
    recs = tmp_path / "r.jsonl"
    recs.write_text(json.dumps({"id": "a", "problem": "p", "answer": "1", "steps": ["s"], "labels": [1], "k": 0})
                    + "\n" + json.dumps({"id": "b", "problem": "q", "steps": ["s"], "labels": [0]}) + "\n")
    assert cli.main(["convert", "--from", "records", "--to", "gsm8k", str(recs), str(tmp_path / "g")]) == 2
    assert f"{recs}:2: record 'b': missing key 'answer'" in capsys.readouterr().err
    assert cli.main(["convert", "--from", "records", "--to", "processbench", str(recs),
                          str(tmp_path / "pb.json")]) == 0
    assert "dropped keys the processbench format has no field for: answer (1 records), k (1 records)" \
        in capsys.readouterr().err
