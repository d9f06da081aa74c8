"""Readers and writers for the step-labelled and problem datasets prm_jax meets.

Every reader turns a file into our own records (DESIGN.md): labelled data becomes
`{"id", "problem", "steps", "labels", ...}` (labels 1 = good step, 0 = bad step; every labelled
step is kept, nothing is truncated here), problem files become `{"id", "problem", "answer", ...}`.
ProcessBench is read as published (`label` = first wrong step, -1 if none). Writers go the other
way, so any labelled format converts to any other through our records.

| name          | file                                   | per record                                           |
|---------------|----------------------------------------|------------------------------------------------------|
| records       | JSONL, our records                     | passed through                                       |
| processbench  | one JSON array                         | id, generator, problem, steps, final_answer_correct, label |
| prm800k       | JSONL, OpenAI's PRM800K release        | question.problem, label.steps[].completions[].rating |
| math-shepherd | JSONL                                  | input (steps end in "ки"), label (same with +/-), task |
| trl           | JSONL, TRL stepwise supervision        | prompt, completions, labels (bools)                  |
| gsm8k         | JSONL                                  | question, answer ("... #### 42")                     |
| math          | JSONL (MATH / MATH-500)                | problem, solution, answer?, subject, level, unique_id |

PRM800K: ratings -1/0/1 with 0 and 1 counted as good (as Qwen's PRM800K model did). A step is
the chosen completion; where the labeler chose none but wrote their own step, the human step is
taken (good); where neither exists the first completion rated -1 ends the solution (bad).

A bad record raises RecordError naming file:line and what was expected; with `skip_bad=True` it
is skipped and its message kept in `ReadResult.skipped` (never dropped silently).

Nothing is lost silently either way: a reader keeps every top-level key it does not map as a key of
the record; a writer to an open format (records, trl: a datasets table takes any column) carries
every key it does not map, and a writer to a fixed published schema (the others) drops them and
`convert` reports which (`ConvertResult.dropped`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

from prm_jax.errors import InputError
from prm_jax.flags import require_records
from prm_jax.records import Line, RecordError, iter_items, read_text

FORMATS = ("records", "processbench", "prm800k", "math-shepherd", "trl", "gsm8k", "math")
LABELLED = ("records", "processbench", "prm800k", "math-shepherd", "trl")
PROBLEMS = ("records", "gsm8k", "math")
SHEPHERD_TAG = "ки"


@dataclasses.dataclass
class ReadResult:
    records: list[dict[str, Any]]
    skipped: list[str]  # one "file:line: why" per skipped record
    where: list[str] = dataclasses.field(default_factory=list)  # "file:line" of each record


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    written: int
    skipped: list[str]
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)  # key -> records that lost it


# --------------------------------------------------------------------------- raw items

def _json_array_items(path: str) -> Iterator[Line | RecordError]:
    """Elements of a top-level JSON array, each with the line it starts on."""
    text = read_text(path)
    dec = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, 0).end()
    if not text.startswith("[", pos):
        raise RecordError(f"{path}:{text.count(chr(10), 0, pos) + 1}: expected a JSON array of records")
    pos = ws.match(text, pos + 1).end()
    if text.startswith("]", pos):
        return
    while True:
        lineno = text.count("\n", 0, pos) + 1
        try:
            rec, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            # The array itself is broken; nothing after this point can be located reliably.
            raise RecordError(f"{path}:{e.lineno}: not valid JSON ({e.msg}) in the array element "
                              f"starting at line {lineno}") from None
        if isinstance(rec, dict):
            yield Line(path, lineno, rec)
        else:
            yield RecordError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        pos = ws.match(text, pos).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            return
        else:
            raise RecordError(f"{path}:{text.count(chr(10), 0, pos) + 1}: expected ',' or ']' in the JSON array")


def _str_list(line: Line, key: str) -> list[str]:
    value = line.get(key, list)
    if not value or not all(isinstance(s, str) for s in value):
        raise RecordError(f"{line.where()}: key {key!r} should be a non-empty list of strings")
    return value


def _label_list(line: Line, key: str, n: int) -> list:
    value = line.get(key, list)
    if len(value) != n:
        raise RecordError(f"{line.where()}: key {key!r} has {len(value)} labels for {n} steps")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise RecordError(f"{line.where()}: key {key!r} should hold 0/1 (or soft labels in [0, 1]), got {v!r}")
    return value


# --------------------------------------------------------------------------- readers (Line -> record)

def _from_records(line: Line) -> dict[str, Any]:
    line.get("id", (str, int))
    if "steps" in line.record:
        steps = _str_list(line, "steps")
        if "labels" in line.record:
            _label_list(line, "labels", len(steps))
    return line.record


def _from_processbench(line: Line) -> dict[str, Any]:
    line.get("id", str)
    line.get("problem", str)
    steps = _str_list(line, "steps")
    label = line.get("label", int)
    if isinstance(label, bool) or not -1 <= label < len(steps):
        raise RecordError(f"{line.where()}: 'label' should be -1 or a step index below {len(steps)}, got {label!r}")
    return dict(line.record)


def _rating(line: Line, i: int, completion: Any) -> int:
    if not isinstance(completion, dict) or not isinstance(completion.get("text"), str):
        raise RecordError(f"{line.where()}: label.steps[{i}] has a completion without a 'text' string")
    r = completion.get("rating")
    if r not in (-1, 0, 1) or isinstance(r, bool):
        raise RecordError(f"{line.where()}: label.steps[{i}]: rating should be -1, 0 or 1, got {r!r}")
    return r


def _from_prm800k(line: Line) -> dict[str, Any]:
    q = line.get("question", dict)
    if not isinstance(q.get("problem"), str):
        raise RecordError(f"{line.where()}: question.problem should be a string")
    label = line.get("label", dict)
    raw_steps = label.get("steps")
    if not isinstance(raw_steps, list):
        raise RecordError(f"{line.where()}: label.steps should be a list")
    steps, labels = [], []
    for i, st in enumerate(raw_steps):
        if not isinstance(st, dict):
            raise RecordError(f"{line.where()}: label.steps[{i}] should be an object")
        comps = st.get("completions") or []
        chosen, human = st.get("chosen_completion"), st.get("human_completion")
        if chosen is not None:
            if not isinstance(chosen, int) or not 0 <= chosen < len(comps):
                raise RecordError(f"{line.where()}: label.steps[{i}].chosen_completion {chosen!r} is not an index "
                                  f"into its {len(comps)} completions")
            r = _rating(line, i, comps[chosen])
            steps.append(comps[chosen]["text"])
            labels.append(int(r >= 0))
        elif human is not None:
            if not isinstance(human, dict) or not isinstance(human.get("text"), str):
                raise RecordError(f"{line.where()}: label.steps[{i}].human_completion has no 'text' string")
            steps.append(human["text"])
            labels.append(1)
        else:
            bad = next((c for c in comps if _rating(line, i, c) == -1), None)
            if bad is not None:
                steps.append(bad["text"])
                labels.append(0)
            break
    if not steps:
        raise RecordError(f"{line.where()}: no labelled step on the chosen path")
    rec = {"id": f"prm800k-{line.lineno}", "problem": q["problem"], "steps": steps, "labels": labels}
    if isinstance(q.get("ground_truth_answer"), str):
        rec["answer"] = q["ground_truth_answer"]
    if label.get("finish_reason") is not None:
        rec["finish_reason"] = label["finish_reason"]
    return rec


_STEP_PREFIX = re.compile(r"Step (\d+):\s?")


def _from_math_shepherd(line: Line) -> dict[str, Any]:
    inp, lab = line.get("input", str), line.get("label", str)
    segments = inp.split(SHEPHERD_TAG)
    if len(segments) < 2:
        raise RecordError(f"{line.where()}: 'input' has no {SHEPHERD_TAG!r} step tag")
    if segments[-1].strip():
        raise RecordError(f"{line.where()}: text after the last {SHEPHERD_TAG!r} tag; expected every step to end in one")
    # 'label' is 'input' with each tag replaced by + or -: read the signs at the tag positions.
    signs, pos = [], 0
    for seg in segments[:-1]:
        if lab[pos: pos + len(seg)] != seg or pos + len(seg) >= len(lab) or lab[pos + len(seg)] not in "+-":
            raise RecordError(f"{line.where()}: 'label' should equal 'input' with each {SHEPHERD_TAG!r} "
                              f"replaced by '+' or '-' (mismatch near character {pos})")
        signs.append(lab[pos + len(seg)])
        pos += len(seg) + 1
    if lab[pos:] != segments[-1]:
        raise RecordError(f"{line.where()}: 'label' has extra text after the last step")
    first = segments[0]
    starts = [m for m in re.finditer(r"Step 1:", first)]
    if not starts:
        raise RecordError(f"{line.where()}: no 'Step 1:' before the first {SHEPHERD_TAG!r} tag")
    cut = starts[-1].start()
    problem = first[:cut].rstrip()
    steps = []
    for k, seg in enumerate([first[cut:]] + segments[1:-1], start=1):
        seg = seg.strip()
        m = _STEP_PREFIX.match(seg)
        if m and int(m.group(1)) == k:
            seg = seg[m.end():]
        steps.append(seg)
    rec = {"id": f"math-shepherd-{line.lineno}", "problem": problem, "steps": steps,
           "labels": [int(s == "+") for s in signs]}
    if "task" in line.record:
        rec["task"] = line.record["task"]
    return rec


def _from_trl(line: Line) -> dict[str, Any]:
    prompt = line.get("prompt", str)
    steps = _str_list(line, "completions")
    labels = line.get("labels", list)
    if len(labels) != len(steps):
        raise RecordError(f"{line.where()}: {len(labels)} labels for {len(steps)} completions")
    if not all(isinstance(v, (bool, int)) and v in (0, 1) for v in labels):
        raise RecordError(f"{line.where()}: 'labels' should be booleans")
    rid = line.record.get("id", f"trl-{line.lineno}")
    return {"id": rid, "problem": prompt, "steps": steps, "labels": [int(v) for v in labels]}


def _from_gsm8k(line: Line) -> dict[str, Any]:
    question, answer = line.get("question", str), line.get("answer", str)
    if "####" not in answer:
        raise RecordError(f"{line.where()}: 'answer' should end with '#### <final answer>'")
    solution, final = answer.rsplit("####", 1)
    return {"id": line.record.get("id", f"gsm8k-{line.lineno - 1}"), "problem": question,
            "answer": final.strip(), "solution": solution.rstrip("\n")}


def _from_math(line: Line) -> dict[str, Any]:
    from prm_jax.grading import last_boxed

    problem = line.get("problem", str)
    solution = line.record.get("solution")
    answer = line.record.get("answer")
    if answer is None:
        answer = last_boxed(solution) if isinstance(solution, str) else None
        if answer is None:
            raise RecordError(f"{line.where()}: no 'answer' and no \\boxed{{}} answer in 'solution'")
    elif not isinstance(answer, str):
        raise RecordError(f"{line.where()}: key 'answer' should be str, got {type(answer).__name__}")
    rid = line.record.get("unique_id") or f"math-{line.lineno - 1}"
    rec = {"id": rid, "problem": problem, "answer": answer}
    for k in ("solution", "subject", "level", "unique_id"):
        if k in line.record:
            rec[k] = line.record[k]
    return rec


# The top-level keys each reader maps into our record; every other key is kept as it is.
_READ_KEYS = {
    "records": (), "processbench": (), "prm800k": ("question", "label"),
    "math-shepherd": ("input", "label", "task"), "trl": ("id", "prompt", "completions", "labels"),
    "gsm8k": ("id", "question", "answer"), "math": ("problem", "solution", "answer", "subject", "level", "unique_id"),
}

_READERS: dict[str, tuple[Callable[[str], Iterator[Line | RecordError]], Callable[[Line], dict]]] = {
    "records": (iter_items, _from_records),
    "processbench": (_json_array_items, _from_processbench),
    "prm800k": (iter_items, _from_prm800k),
    "math-shepherd": (iter_items, _from_math_shepherd),
    "trl": (iter_items, _from_trl),
    "gsm8k": (iter_items, _from_gsm8k),
    "math": (iter_items, _from_math),
}


def read(fmt: str, path: str | os.PathLike, skip_bad: bool = False) -> ReadResult:
    """All records of a file in format `fmt`, as our records."""
    if fmt not in _READERS:
        raise InputError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    items, convert_one = _READERS[fmt]
    result = ReadResult([], [])
    for item in items(os.fspath(path)):
        try:
            if isinstance(item, RecordError):
                raise item
            rec = convert_one(item)
        except RecordError as e:
            if not skip_bad:
                raise
            result.skipped.append(str(e))
            continue
        extra = {k: v for k, v in item.record.items() if k not in _READ_KEYS[fmt] and k not in rec}
        result.records.append({**rec, **extra})
        result.where.append(item.where())
    return result


# --------------------------------------------------------------------------- writers (record -> dict)

def _need(rec: dict[str, Any], *keys: str) -> None:
    for k in keys:
        if k not in rec:
            raise RecordError(f"record {rec.get('id', '?')!r}: missing key {k!r}, needed by the output format")


def step_labels(rec: dict[str, Any]) -> tuple[list[str], list]:
    """(steps, labels) of a labelled record; ProcessBench-style `label` gives the steps up to and
    including the first wrong one."""
    if "labels" in rec:
        _need(rec, "steps")
        return rec["steps"], rec["labels"]
    if isinstance(rec.get("label"), int):
        _need(rec, "steps")
        k = rec["label"]
        return (rec["steps"], [1] * len(rec["steps"])) if k == -1 else (rec["steps"][: k + 1], [1] * k + [0])
    raise RecordError(f"record {rec.get('id', '?')!r}: no 'labels' (or ProcessBench 'label') to write")


def _hard(v) -> bool:
    return v >= 0.5


def _to_processbench(rec):
    _need(rec, "id", "problem", "steps")
    if "label" in rec and "labels" not in rec:
        label = rec["label"]
    else:
        _, labels = step_labels(rec)
        label = next((i for i, v in enumerate(labels) if not _hard(v)), -1)
    return {"id": rec["id"], "generator": rec.get("generator"), "problem": rec["problem"], "steps": rec["steps"],
            "final_answer_correct": rec.get("final_answer_correct"), "label": label}


_PRM800K_META = {"labeler": None, "timestamp": None, "generation": None, "is_quality_control_question": False,
                 "is_initial_screening_question": False}


def _to_prm800k(rec):
    _need(rec, "problem")
    steps, labels = step_labels(rec)
    out_steps = [{"completions": [{"text": s, "rating": 1 if _hard(v) else -1, "flagged": False}],
                  "human_completion": None, "chosen_completion": 0} for s, v in zip(steps, labels)]
    finish = rec.get("finish_reason") or ("solution" if all(map(_hard, labels)) else "found_error")
    return {**{k: rec.get(k, v) for k, v in _PRM800K_META.items()},
            "question": {"problem": rec["problem"], "ground_truth_answer": rec.get("answer")},
            "label": {"steps": out_steps, "total_time": None, "finish_reason": finish}}


def _to_math_shepherd(rec):
    _need(rec, "problem")
    steps, labels = step_labels(rec)
    body = [f"Step {k}: {s}" for k, s in enumerate(steps, start=1)]
    inp = rec["problem"] + " " + "\n".join(f"{b} {SHEPHERD_TAG}" for b in body)
    lab = rec["problem"] + " " + "\n".join(f"{b} {'+' if _hard(v) else '-'}" for b, v in zip(body, labels))
    return {"input": inp, "label": lab, "task": rec.get("task", "")}


def _to_trl(rec):
    _need(rec, "id", "problem")
    steps, labels = step_labels(rec)
    return {"id": rec["id"], "prompt": rec["problem"], "completions": list(steps), "labels": [_hard(v) for v in labels]}


def _to_gsm8k(rec):
    _need(rec, "problem", "answer")
    sol = rec.get("solution")
    return {"question": rec["problem"], "answer": (f"{sol}\n#### {rec['answer']}" if sol else f"#### {rec['answer']}")}


def _to_math(rec):
    _need(rec, "problem", "answer")
    out = {"problem": rec["problem"], "solution": rec.get("solution", ""), "answer": rec["answer"]}
    for k in ("subject", "level", "unique_id"):
        if k in rec:
            out[k] = rec[k]
    return out


# The record keys each writer maps into its format. Open formats carry every other key as it is;
# fixed schemas (the rest) drop them, and `convert` says which.
_WRITE_KEYS = {
    "records": None, "trl": ("id", "problem", "steps", "labels", "label"),
    "processbench": ("id", "generator", "problem", "steps", "final_answer_correct", "label", "labels"),
    "prm800k": ("problem", "answer", "steps", "labels", "label", "finish_reason", *_PRM800K_META),
    "math-shepherd": ("problem", "steps", "labels", "label", "task"),
    "gsm8k": ("problem", "answer", "solution"),
    "math": ("problem", "solution", "answer", "subject", "level", "unique_id"),
}
OPEN_FORMATS = ("records", "trl")


def unmapped_keys(fmt: str, rec: dict[str, Any]) -> list[str]:
    """The keys of `rec` that the writer of `fmt` does not map into its own fields."""
    used = _WRITE_KEYS[fmt]
    return [] if used is None else [k for k in rec if k not in used]


_WRITERS: dict[str, Callable[[dict], dict]] = {
    "records": lambda r: r,
    "processbench": _to_processbench,
    "prm800k": _to_prm800k,
    "math-shepherd": _to_math_shepherd,
    "trl": _to_trl,
    "gsm8k": _to_gsm8k,
    "math": _to_math,
}


def _row(fmt: str, rec: dict[str, Any]) -> dict[str, Any]:
    row = _WRITERS[fmt](rec)
    if fmt in OPEN_FORMATS:
        row.update({k: rec[k] for k in unmapped_keys(fmt, rec) if k not in row})
    return row


def write(fmt: str, path: str | os.PathLike, records: list[dict[str, Any]], where: list[str] | None = None) -> int:
    """Write records in format `fmt` atomically (temp file + rename); returns the count. `where`
    ("file:line" per record, from `read`) makes a record that cannot be written name its source line.

    External formats are written the way their releases are (ASCII-escaped JSONL; ProcessBench
    as an indented JSON array) so a read + write of an original file gives it back."""
    if fmt not in _WRITERS:
        raise InputError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    rows = []
    for i, rec in enumerate(records):
        try:
            rows.append(_row(fmt, rec))
        except RecordError as e:
            if not where:
                raise
            raise RecordError(f"{where[i]}: {e} (writing {fmt})") from None
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        if fmt == "processbench":
            json.dump(rows, f, indent=2, ensure_ascii=False)
        else:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=(fmt != "records")) + "\n")
    os.replace(tmp, path)
    return len(rows)


def convert(src: str, dst: str, in_path: str, out_path: str, skip_bad: bool = False,
            allow_empty: bool = False) -> ConvertResult:
    """Read `in_path` as `src`, write `out_path` as `dst` (an input with no records at all is an
    error unless `allow_empty`)."""
    if src in PROBLEMS and dst in LABELLED and src != "records" and dst != "records":
        raise InputError(f"{src} holds problems without step labels; it converts to records, gsm8k or math")
    if src in LABELLED and dst in ("gsm8k", "math") and src != "records":
        raise InputError(f"{src} holds labelled solutions; {dst} is a problem format")
    result = read(src, in_path, skip_bad=skip_bad)
    require_records(result.records + result.skipped, in_path, allow_empty)
    n = write(dst, out_path, result.records, result.where)
    dropped: dict[str, int] = {}
    if dst not in OPEN_FORMATS:
        for rec in result.records:
            for k in unmapped_keys(dst, rec):
                dropped[k] = dropped.get(k, 0) + 1
    return ConvertResult(n, result.skipped, dropped)
