"""MC estimation's failure modes in the toy world: a scripted completer that writes what a policy
trained on the world's solutions writes (restarts, checks, slips at the world's shares), and the
count, from the truth, of where MC labels went wrong and why.

The paper (arXiv 2501.07301, section 3) names two ways MC step labels fail:
- a wrong step labelled right: some completion reaches the right answer from it, because the
  completer re-derives the answer from the problem instead of continuing the wrong chain (here:
  a restart), or because the wrong step computed a quantity the answer does not use (a check);
- a right step labelled wrong: every completion fails from it, because the completer is weak
  (here: it slips at the last step).
`mc_failures` counts each on MC-labelled records against `world.check_steps`.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prm_jax.data.steps import join_steps
from prm_jax.toyworld.world import (
    CHECK_KIND, apply_op, check_steps, format_step, parse_step, restart_steps, world_of,
)


def complete(world: Mapping[str, Any], prefix: Sequence[str], rng: random.Random, restart_rate: float = 0.0,
             slip_rate: float = 0.0) -> list[str]:
    """The steps a scripted completer writes after `prefix`, as the world's solutions teach: right
    after a wrong operation step it starts again with probability `restart_rate` (and so reaches the
    right answer); otherwise it continues the chain it believes in (the last value an operation step
    wrote; a check step changes nothing), and with probability `slip_rate` miscomputes its last step.
    A prefix that already states an answer gets nothing more."""
    world = world_of(world)
    ops = world["ops"]
    done, value, last_op_step = 0, world["start"], False
    for text in prefix:
        parsed = parse_step(text)
        last_op_step = parsed is not None and "op" in parsed and not parsed["check"]
        if parsed is None or parsed.get("check"):
            continue
        if parsed["answer"] is not None:
            return []
        done, value = (1 if parsed["restart"] else done + 1), parsed["c"]
    verdict = check_steps(world, list(prefix))
    if last_op_step and verdict.first_error == len(prefix) - 1 and rng.random() < restart_rate:
        return restart_steps(world)
    steps = []
    for i in range(done, len(ops)):
        op, b = ops[i]
        c = apply_op(value, op, b)
        if c is None or c < 0:
            return steps  # the chain leaves the integers: no answer
        last = i == len(ops) - 1
        if last and rng.random() < slip_rate:
            c += 1
        steps.append(format_step(value, op, b, c, c if last else None))
        value = c
    return steps


class ScriptedCompleter:
    """An `mc.Policy` over `complete`: requests are matched to their world by the problem text."""

    def __init__(self, problems: Iterable[Mapping[str, Any]], restart_rate: float = 0.0, slip_rate: float = 0.0,
                 seed: int = 0):
        self.worlds = {p["problem"]: world_of(p) for p in problems}
        self.restart_rate, self.slip_rate, self.rng = restart_rate, slip_rate, random.Random(seed)

    def __call__(self, requests, n: int) -> list[list[str]]:
        return [[join_steps(complete(self.worlds[r.problem], r.steps, self.rng, self.restart_rate, self.slip_rate))
                 for _ in range(n)] for r in requests]


def _rank(k: int) -> float:
    return math.inf if k < 0 else k  # -1 (no error) comes after every step


def has_step(steps: Sequence[str], key: str) -> bool:
    """Whether a solution has a restart (key "restart") or a check (key "check") step."""
    return any((p := parse_step(s)) is not None and p.get(key) for s in steps)


def mc_failures(records: Iterable[Mapping[str, Any]], first_error=None) -> dict[str, Any]:
    """Where MC labels (or any source: `first_error(record)`, default `record["mc"]["first_error"]`)
    miss the truth, and why, over records that carry their world:
      n                         solutions with a verdict and a truth
      agree                     first error = the truth
      wrong_step_passed         the source puts the first error after the true one (a completer
                                reached the right answer from a wrong step), split by the true first
                                error's kind: `unused_quantity` (a wrong check) and `rederived` (any
                                other: the completer started again or otherwise re-derived the answer)
      right_step_failed         the source puts it before the true one (every completion failed
                                from a right step: a weak completer)
      solutions_restarting, solutions_with_check   the labelled solutions' own restarts and checks
    """
    first_error = first_error or (lambda r: r["mc"]["first_error"])
    out = {"n": 0, "agree": 0, "wrong_step_passed": {"unused_quantity": 0, "rederived": 0}, "right_step_failed": 0,
           "solutions_restarting": 0, "solutions_with_check": 0}
    for rec in records:
        verdict, pred = check_steps(rec, rec["steps"]), first_error(rec)
        if verdict.first_error is None or pred is None:
            continue
        out["n"] += 1
        out["solutions_restarting"] += has_step(rec["steps"], "restart")
        out["solutions_with_check"] += has_step(rec["steps"], "check")
        t = verdict.first_error
        if _rank(pred) > _rank(t):
            out["wrong_step_passed"]["unused_quantity" if verdict.reason == CHECK_KIND else "rederived"] += 1
        elif _rank(pred) < _rank(t):
            out["right_step_failed"] += 1
        else:
            out["agree"] += 1
    return out

