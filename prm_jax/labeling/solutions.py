"""Solution records as the labelling stages read them (DESIGN.md's solution format), with where
each came from for error messages."""
from __future__ import annotations

import dataclasses
from typing import Any

from prm_jax.records import Line, RecordError, iter_lines


def gold_answer(line: Line) -> str:
    """A record's gold `answer`: a string, or a number kept as its string."""
    ans = line.get("answer", (str, int, float))
    if isinstance(ans, bool):
        raise RecordError(f"{line.where()}: key 'answer' should be str or a number, got bool")
    return str(ans)


@dataclasses.dataclass(frozen=True)
class Solution:
    """A solution record and where it came from ("file:line", for error messages)."""
    record: dict[str, Any]
    where: str

    @property
    def id(self) -> Any:
        return self.record["id"]


def read_solutions(path: str, need_answer: bool = False) -> list[Solution]:
    """Solution records; each needs an id, a problem string and a list of string steps (empty when
    the policy wrote nothing: `prm-jax judge` leaves those out, as there is nothing to judge), and
    with `need_answer` the gold `answer` (a string or a number, kept as a string)."""
    out, seen = [], {}
    for line in iter_lines(path):
        rid = line.get("id", (str, int))
        line.get("problem", str)
        steps = line.get("steps", list)
        if not all(isinstance(s, str) for s in steps):
            raise RecordError(f"{line.where()}: key 'steps' should be a list of strings")
        if rid in seen:
            raise RecordError(f"{line.where()}: duplicate id {rid!r} (first at line {seen[rid]})")
        seen[rid] = line.lineno
        record = line.record
        if need_answer:
            record = {**record, "answer": gold_answer(line)}
        out.append(Solution(record, line.where()))
    return out
