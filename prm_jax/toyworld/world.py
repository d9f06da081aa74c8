"""A toy world of multi-step arithmetic word problems whose every solution step is checkable.

A problem is a start value and a list of operations, told in a fixed short template language:

    Sam has 7 coins. He finds 5 more coins. Then he gives away 3 coins. How many coins does Sam have now?

and its reference solution has one step per operation, the last one carrying the boxed answer
(steps are joined with blank lines, the way `prm-jax sample` splits them):

    7 + 5 = 12
    12 - 3 = 9. The answer is \\boxed{9}.

In a restating world (`WorldConfig(restate=True)`, kept as `"restate": true` in the world) each
step first restates the sentence it applies, `He finds 5 more coins: 7 + 5 = 12`, so that which
number a step should use can be read off the step itself; the checker reads past the restatement
and judges the equation.

MC estimation's failure modes, by construction (the paper's section 3): two kinds of step the
reference solutions can carry, each with its share a world setting (`WorldConfig.restart_rate`,
`check_rate`, `slip_rate`; all 0 by default, so the plain world is unchanged), which the policy
learns from its training solutions (`sample_solutions`) and so writes itself:

- a *restart* (`Start again: 7 + 5 = 12`, the whole computation re-derived from the problem's
  numbers) right after a wrong step, so a completer that restarts reaches the right answer from
  a wrong step: MC calls that step right, the truth wrong;
- a *check* (`Check: 12 - 5 = 7`, the step just taken undone): a quantity the answer never uses,
  so a wrong check (it repeats the step's operation instead of undoing it) leaves the answer
  right: MC again calls it right;
- a *slip* of the completer: solutions whose last step is miscomputed (share `slip_rate`), so a
  completer that learned them fails from right steps: MC calls a right step wrong when every
  rollout slips.

Because the structured form travels with the record (`"world": {"start": 7, "ops": [["+", 5],
["-", 3]], ...}`), `check_steps` re-derives the running value and knows, for any free-form text
a model writes, the true first wrong step.

Truth semantics (ProcessBench's): the label of a solution is the index of its *earliest* wrong
step, -1 if every step is right and the answer is stated. A step is right iff it parses as
`a OP b = c` with `a` the true running value, `OP b` the problem's next operation, and `c`
computed exactly; the step that applies the last operation must state the answer (`... The
answer is \\boxed{c}.`), or the next step must be just `The answer is \\boxed{c}.`. Steps after the
first error are not judged on their own: a later step that correctly continues from a wrong value
is still part of a wrong solution (per-step truth is "this step and all before it are right",
see `Verdict.step_correct`). Text that does not parse is a wrong step. A solution that stops
before stating the answer has its last step marked wrong ("unfinished" / "missing_answer");
an empty solution has no label (`first_error is None`).
"""
from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prm_jax.errors import InputError
from prm_jax import grading
from prm_jax.data.steps import join_steps

OPS = ("+", "-", "*", "/")
ERROR_KINDS = ("arithmetic", "wrong_operand", "wrong_operation", "wrong_carry", "skipped_step")

NAMES = (("Sam", "he"), ("Ana", "she"), ("Tom", "he"), ("Mia", "she"),
         ("Ben", "he"), ("Lily", "she"), ("Max", "he"), ("Zoe", "she"))
ITEMS = (("coin", "coins"), ("apple", "apples"), ("marble", "marbles"), ("book", "books"),
         ("card", "cards"), ("shell", "shells"), ("sticker", "stickers"), ("pencil", "pencils"))

# Two phrasings per operation; {p} = pronoun, {n} = operand, {items} = singular/plural by {n}.
OP_PHRASES = {
    "+": ("{p} finds {n} more {items}.", "{p} buys {n} more {items}."),
    "-": ("{p} gives away {n} {items}.", "{p} loses {n} {items}."),
    "*": ("{p} ends up with {n} times as many {all}.", "the number of {all} {p} has grows {n} times."),
    "/": ("{p} splits the {all} into {n} equal piles and keeps one pile.",
          "{p} puts the {all} into {n} equal boxes and keeps one box."),
}
CHECK_KIND = "wrong_check"  # the error a check step can carry (not one of ERROR_KINDS: a step kind of its own)
RESTART_SAID = "Start again"  # what a restart step says before its equation
CHECK_SAID = "Check"  # what a check step says before its equation
INVERSE = {"+": "-", "-": "+", "*": "/", "/": "*"}
SYMBOLS = {"+": "+", "-": "-", "*": "*", "/": "/", "x": "*", "×": "*", "÷": "/"}
ANSWER_TEXT = "The answer is \\boxed{{{}}}."


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """How hard the world is. Every value ever written (start, intermediate, answer) stays in
    [0, max_value]; `+`/`-` operands are 1..max_operand, `*`/`/` operands 2..max_factor."""
    min_steps: int = 2
    max_steps: int = 4
    max_start: int = 20
    max_operand: int = 20
    max_factor: int = 3
    max_value: int = 60
    ops: tuple[str, ...] = ("+", "-", "*")
    restate: bool = False  # each solution step first restates the sentence it applies
    # MC's failure modes (module docstring): shares in the solutions `sample_solutions` writes
    restart_rate: float = 0.0  # of the solutions with a wrong step before the last: start again after it
    check_rate: float = 0.0  # of the solutions: one check step (an unused quantity) after a step
    slip_rate: float = 0.0  # of the otherwise right solutions: the last step miscomputed

    def __post_init__(self):
        for name in ("restart_rate", "check_rate", "slip_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 1 <= self.min_steps <= self.max_steps:
            raise InputError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if not self.ops or any(op not in OPS for op in self.ops):
            raise InputError(f"ops must be a non-empty subset of {OPS}, got {self.ops}")
        if self.max_value < max(self.max_start, self.max_operand, 2 * self.max_factor):
            raise InputError("max_value must be >= max_start, max_operand and 2 * max_factor")

    @classmethod
    def tiny(cls, **kw) -> "WorldConfig":
        """The demo's tiny size: 2-3 steps of + and -, operands 1-9, values <= 30. (A 2-layer,
        hidden-64 policy reached ~15% greedy accuracy after 500 steps of batch 16 on a busy 2-core CPU.)"""
        return cls(**{**dict(min_steps=2, max_steps=3, max_operand=9, max_value=30, ops=("+", "-")), **kw})

    @classmethod
    def small(cls, **kw) -> "WorldConfig":
        """The demo's small size: 2-4 steps of +, - and *, operands 1-20, values <= 60 (the defaults)."""
        return cls(**kw)

    @classmethod
    def for_size(cls, size: str, **kw) -> "WorldConfig":
        if size not in ("tiny", "small"):
            raise InputError(f"size must be 'tiny' or 'small', got {size!r}")
        return getattr(cls, size)(**kw)


# ---------------------------------------------------------------- arithmetic

def apply_op(value: int, op: str, operand: int) -> int | None:
    """`value op operand` as an exact integer, None when not exact (division with remainder, or by 0)."""
    if op == "+":
        return value + operand
    if op == "-":
        return value - operand
    if op == "*":
        return value * operand
    if op == "/":
        return value // operand if operand and value % operand == 0 else None
    raise ValueError(f"unknown operation {op!r} (expected one of {OPS})")


def running_values(world: Mapping[str, Any]) -> list[int]:
    """[start, after op 1, ..., after the last op]; the last one is the answer."""
    world = world_of(world)
    values = [world["start"]]
    for op, operand in world["ops"]:
        values.append(apply_op(values[-1], op, operand))
        if values[-1] is None or values[-1] < 0:
            raise InputError(f"toy world {dict(world)} leaves the non-negative integers at "
                             f"{values[-2]} {op} {operand}")
    return values


def world_of(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """The toy world of a problem/solution record (its "world" key) or a world dict itself,
    checked: {"start": int >= 0, "ops": [[op, int], ...] (at least one), ...}."""
    world = obj.get("world", obj) if isinstance(obj, Mapping) else obj
    where = f"record {obj.get('id')!r}: " if isinstance(obj, Mapping) and "id" in obj else ""
    want = "a toy world {'start': int, 'ops': [[op, int], ...]} (or a record with a 'world' key)"
    if not isinstance(world, Mapping) or "start" not in world or "ops" not in world:
        keys = sorted(world) if isinstance(world, Mapping) else type(world).__name__
        raise InputError(f"{where}expected {want}, got {keys}")
    start, ops = world["start"], world["ops"]
    ok = isinstance(start, int) and start >= 0 and isinstance(ops, list) and ops and all(
        isinstance(o, (list, tuple)) and len(o) == 2 and o[0] in OPS and isinstance(o[1], int) for o in ops)
    if not ok:
        raise InputError(f"{where}expected {want} with start >= 0, ops from {OPS} and at least one op, "
                         f"got start={start!r}, ops={ops!r}")
    return world


# ---------------------------------------------------------------- generator

def _feasible(value: int, op: str, cfg: WorldConfig) -> list[int]:
    if op == "+":
        return list(range(1, min(cfg.max_operand, cfg.max_value - value) + 1))
    if op == "-":
        return list(range(1, min(cfg.max_operand, value) + 1))
    if op == "*":
        return [k for k in range(2, cfg.max_factor + 1) if value * k <= cfg.max_value and value > 0]
    return [k for k in range(2, cfg.max_factor + 1) if value > 0 and value % k == 0]


def sample_world(rng: random.Random, cfg: WorldConfig = WorldConfig()) -> dict[str, Any]:
    """One structured problem: start value, operations, and the surface choices (name, item, phrasing)."""
    n_steps = rng.randint(cfg.min_steps, cfg.max_steps)
    while True:  # a start value can dead-end only in odd configs (e.g. ops=("/",)); retry then
        value = rng.randint(1, cfg.max_start)
        start, ops = value, []
        for _ in range(n_steps):
            choices = [(op, ks) for op in cfg.ops if (ks := _feasible(value, op, cfg))]
            if not choices:
                break
            op, ks = rng.choice(choices)
            operand = rng.choice(ks)
            ops.append([op, operand])
            value = apply_op(value, op, operand)
        if len(ops) == n_steps:
            break
    name, _ = rng.choice(NAMES)
    item = rng.randrange(len(ITEMS))
    world = {"start": start, "ops": ops, "name": name, "item": ITEMS[item][1],
             "phrasing": [rng.randrange(2) for _ in ops]}
    return {**world, "restate": True} if cfg.restate else world


def _items(world: Mapping[str, Any]) -> tuple[str, str]:
    plural = world.get("item", "coins")
    return dict((p, s) for s, p in ITEMS).get(plural, plural), plural


def op_sentence(world: Mapping[str, Any], i: int) -> str:
    """The sentence telling operation `i`, capitalised, e.g. "He finds 5 more coins."."""
    world = world_of(world)
    singular, plural = _items(world)
    op, n = world["ops"][i]
    phrasing = world.get("phrasing") or [0] * len(world["ops"])
    text = OP_PHRASES[op][phrasing[i] % 2].format(p=dict(NAMES).get(world.get("name", "Sam"), "they"), n=n,
                                                  items=singular if n == 1 else plural, all=plural)
    return text[0].upper() + text[1:]


def render_problem(world: Mapping[str, Any]) -> str:
    """The word problem text of a structured world."""
    world = world_of(world)
    name = world.get("name", "Sam")
    singular, plural = _items(world)
    start = world["start"]
    parts = [f"{name} has {start} {singular if start == 1 else plural}."]
    for i in range(len(world["ops"])):
        text = op_sentence(world, i)
        parts.append(f"Then {text[0].lower()}{text[1:]}" if i else text)
    parts.append(f"How many {plural} does {name} have now?")
    return " ".join(parts)


def generate_problems(n: int, seed: int = 0, cfg: WorldConfig = WorldConfig(),
                      id_prefix: str = "toy") -> list[dict[str, Any]]:
    """`n` problem records {"id", "problem", "answer", "world"}; the same seed gives the same list."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        world = sample_world(rng, cfg)
        records.append({"id": f"{id_prefix}-{seed}-{i}", "problem": render_problem(world),
                        "answer": str(running_values(world)[-1]), "world": world})
    return records


# ---------------------------------------------------------------- solutions

def format_step(a: int, op: str, b: int, c: int, answer: int | None = None, said: str | None = None) -> str:
    """`a op b = c[. The answer is \\boxed{answer}.]`, after `said: ` (a restated sentence) if given."""
    step = f"{a} {op} {b} = {c}"
    step = step if answer is None else f"{step}. {ANSWER_TEXT.format(answer)}"
    return step if said is None else f"{said.rstrip('.')}: {step}"


def check_text(value: int, op: str, b: int, wrong: bool = False) -> str | None:
    """The check after a step that took the running value to `value` by `op b`: `Check: value INV b =
    before` (the step undone). `wrong`: the check repeats `op` instead of undoing it (an error in a
    quantity the answer never uses). None when the result leaves the integers >= 0."""
    op2 = op if wrong else INVERSE[op]
    c = apply_op(value, op2, b)
    return None if c is None or c < 0 else f"{CHECK_SAID}: {format_step(value, op2, b, c)}"


def restart_steps(world: Mapping[str, Any]) -> list[str]:
    """The reference solution re-derived from the problem's numbers, its first step marked as a restart.
    Never restated, even in a restating world: a restart is the bare computation (and half as long)."""
    steps = _continue({**world_of(world), "restate": False}, world_of(world)["start"], 0)
    return [f"{RESTART_SAID}: {steps[0]}"] + steps[1:]


def _said(world: Mapping[str, Any], i: int) -> str | None:
    """What the step applying operation `i` restates: its sentence in a restating world, else nothing."""
    return op_sentence(world, i) if world.get("restate") else None


def write_solution(world: Mapping[str, Any]) -> list[str]:
    """The reference solution: one step per operation, the last also stating the boxed answer."""
    world = world_of(world)
    return _continue(world, world["start"], 0)


def _continue(world: Mapping[str, Any], value: int, first: int) -> list[str] | None:
    """Steps that apply operations first.. correctly from `value` (possibly a wrong one), boxing
    the result at the end; None when a value would leave the integers >= 0."""
    steps, ops = [], world["ops"]
    for i in range(first, len(ops)):
        op, b = ops[i]
        c = apply_op(value, op, b)
        if c is None or c < 0:
            return None
        steps.append(format_step(value, op, b, c, c if i == len(ops) - 1 else None, _said(world, i)))
        value = c
    return steps


def inject_error(world: Mapping[str, Any], kind: str, step: int, rng: random.Random) -> list[str] | None:
    """A solution whose first error is exactly at `step`, of the given kind, continued consistently
    from the wrong value (as a solver who believes it would). Returns None when that kind cannot
    go at that step (e.g. skipping the last operation, or no valid wrong value exists).

    Kinds: "arithmetic" (right a, op, b; wrong c), "wrong_operand" (another b, c computed from it),
    "wrong_operation" (another op, c computed from it), "wrong_carry" (a is not the running value,
    the rest computed from it), "skipped_step" (operation `step` is left out: the step at that
    position applies operation step+1 to the running value)."""
    world = world_of(world)
    ops, values = world["ops"], running_values(world)
    n = len(ops)
    if kind not in ERROR_KINDS:
        raise ValueError(f"unknown error kind {kind!r} (expected one of {ERROR_KINDS})")
    if not 0 <= step < n:
        raise ValueError(f"step {step} out of range for a {n}-step problem")
    prefix = write_solution(world)[:step]
    a, (op, b), last = values[step], ops[step], step == n - 1

    def wrong_steps(a2: int, op2: str, b2: int, c2: int | None) -> list[str] | None:
        if c2 is None or c2 < 0 or (a2, op2, b2, c2) == (a, op, b, values[step + 1]):
            return None
        rest = _continue(world, c2, step + 1)
        if rest is None:
            return None
        return [format_step(a2, op2, b2, c2, c2 if last else None, _said(world, step))] + rest

    candidates: list[list[str] | None] = []
    if kind == "arithmetic":
        true_c = values[step + 1]
        candidates = [wrong_steps(a, op, b, true_c + d) for d in (-3, -2, -1, 1, 2, 3, 10, -10)]
    elif kind == "wrong_operand":
        others = sorted({b + d for d in (-2, -1, 1, 2)} | {x for _, x in ops} | {world["start"]})
        candidates = [wrong_steps(a, op, b2, apply_op(a, op, b2)) for b2 in others if b2 > 0 and b2 != b]
    elif kind == "wrong_operation":
        swap = {"+": "-", "-": "+", "*": "+", "/": "*"}
        candidates = [wrong_steps(a, op2, b, apply_op(a, op2, b))
                      for op2 in [swap[op]] + [o for o in OPS if o not in (op, swap[op])]]
    elif kind == "wrong_carry":
        candidates = [wrong_steps(a + d, op, b, apply_op(a + d, op, b)) for d in (-2, -1, 1, 2, 10) if a + d >= 0]
    elif kind == "skipped_step":
        # Skipping the last operation, or one equal to the next, would not put the error here.
        if last or list(ops[step + 1]) == list(ops[step]):
            return None
        candidates = [_continue(world, a, step + 1)]
    valid = [c for c in candidates if c is not None]
    if not valid:
        return None
    return prefix + rng.choice(valid)


# ---------------------------------------------------------------- checking

_NUM = r"(-?\d+)"
_BOX = r"\\boxed\{\s*" + _NUM + r"\s*\}"
_ANSWER = r"(?:the\s+(?:final\s+)?answer\s+is\s*:?\s*)?" + _BOX
_SAID = r"(?:([^:=\n]*):\s*)?"  # an optional restated sentence (or Check / Start again) before the equation
_EQ_RE = re.compile(r"^\s*" + _SAID + _NUM + r"\s*([-+*/x×÷])\s*" + _NUM + r"\s*=\s*" + _NUM
                    + r"\s*(?:[.,;:]?\s*" + _ANSWER + r")?\s*\.?\s*$", re.IGNORECASE)
_ANSWER_RE = re.compile(r"^\s*" + _ANSWER + r"\s*\.?\s*$", re.IGNORECASE)


def parse_step(text: str) -> dict[str, Any] | None:
    """{"a","op","b","c","answer","check","restart"} for `[restated sentence: ]a OP b = c[. The answer is
    \\boxed{d}.]`, {"answer": d} for a bare answer statement, None for anything else. A restated sentence
    is not checked: the equation is what the step does; `Check: ...` makes it a check step, a sentence
    starting `Start again` a restart (see the module docstring)."""
    m = _EQ_RE.match(text)
    if m:
        said, a, op, b, c, ans = m.groups()
        said = (said or "").strip().lower()
        return {"a": int(a), "op": SYMBOLS[op.lower()], "b": int(b), "c": int(c),
                "answer": None if ans is None else int(ans), "check": said == CHECK_SAID.lower(),
                "restart": said.startswith(RESTART_SAID.lower())}
    m = _ANSWER_RE.match(text)
    if m:
        return {"answer": int(m.group(1))}
    return None


def extract_answer(steps: Sequence[str]) -> str | None:
    """The solution's final answer as the project's grader extracts it (last \\boxed{}, else
    "the answer is ..."), None if it states none."""
    return grading.extract_answer(join_steps(steps))


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The truth about one solution. `first_error` is the ProcessBench label (-1 = all right, None
    = empty solution); `reason` says why that step is wrong; `step_correct[i]` = steps 0..i are all
    right (the per-step truth a PRM is trained towards); `final_answer_correct` compares the last
    boxed value with the true answer."""
    first_error: int | None
    reason: str | None
    step_correct: tuple[bool, ...]
    final_answer: str | None
    final_answer_correct: bool


def check_steps(world: Mapping[str, Any], steps: Sequence[str]) -> Verdict:
    """Check a (possibly model-written) solution against the world; see the module docstring."""
    world = world_of(world)
    if isinstance(steps, str) or not all(isinstance(s, str) for s in steps):
        raise TypeError("steps must be a list of strings")
    ops, values = world["ops"], running_values(world)
    answer = values[-1]
    final = extract_answer(steps)
    final_ok = final is not None and _int_or_none(final) == answer
    first_error, reason = None, None
    done = 0          # operations applied so far (all correctly, while no error has been found)
    answered = False  # the answer has been stated
    for i, text in enumerate(steps):
        parsed = parse_step(text)
        reason = _step_error(parsed, done, ops, values, answered)
        if reason is not None:
            first_error = i
            break
        done = _advance(parsed, done)
        answered = parsed["answer"] is not None
    if first_error is None and steps and not answered:
        first_error, reason = len(steps) - 1, ("missing_answer" if done == len(ops) else "unfinished")
    if first_error is None:
        first_error = -1 if steps else None
    cut = len(steps) if first_error in (-1, None) else first_error
    return Verdict(first_error, reason, tuple(i < cut for i in range(len(steps))), final, final_ok)


def _int_or_none(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _advance(parsed: dict[str, Any], done: int) -> int:
    """Operations applied after a right step: a check applies none, a restart begins again at the first."""
    if "op" not in parsed or parsed["check"]:
        return done
    return 1 if parsed["restart"] else done + 1


def expected_check(values: Sequence[int], ops, done: int) -> str | None:
    """The check step that is right after `done` operations were applied correctly, None before any."""
    if done == 0:
        return None
    op, b = ops[done - 1]
    return check_text(values[done], op, b)


def _step_error(parsed, done: int, ops, values, answered: bool) -> str | None:
    """Why this step is wrong given that everything before it was right, or None."""
    if parsed is None:
        return "unparseable"
    if answered:
        return "after_answer"
    if "op" not in parsed:  # bare answer statement
        if done < len(ops):
            return "premature_answer"
        return None if parsed["answer"] == values[-1] else "wrong_answer"
    if parsed["check"]:  # right iff it undoes the step just taken, exactly, and states no answer
        want = expected_check(values, ops, done)
        got = f"{CHECK_SAID}: {format_step(parsed['a'], parsed['op'], parsed['b'], parsed['c'])}"
        return None if want == got and parsed["answer"] is None else CHECK_KIND
    if parsed["restart"]:
        done = 0
    if done >= len(ops):
        return "extra_step"
    op, b = ops[done]
    if parsed["a"] != values[done]:
        return "wrong_carry"
    if parsed["op"] != op:
        return "wrong_operation"
    if parsed["b"] != b:
        return "wrong_operand"
    if parsed["c"] != values[done + 1]:
        return "arithmetic"
    if parsed["answer"] is not None:
        if done + 1 < len(ops):
            return "premature_answer"
        if parsed["answer"] != values[-1]:
            return "wrong_answer"
    return None


# ---------------------------------------------------------------- datasets

def solution_record(problem: Mapping[str, Any], steps: list[str], generator: str,
                    suffix: str = "") -> dict[str, Any]:
    """A solution record (DESIGN.md format) keeping every key of the problem record."""
    return {**problem, "id": f"{problem['id']}{suffix}", "steps": steps,
            "final_answer": extract_answer(steps), "generator": generator}


def sample_solutions(problems: Iterable[Mapping[str, Any]], seed: int = 0, error_rate: float = 0.5,
                     kinds: Sequence[str] = ERROR_KINDS, per_problem: int = 1, restart_rate: float = 0.0,
                     check_rate: float = 0.0, slip_rate: float = 0.0) -> list[dict[str, Any]]:
    """Solution records with controlled errors: each is the reference solution, or with probability
    `error_rate` one with an injected error (uniform kind and position among those that apply).
    `generator` names what produced it ("toy-reference" or "toy-error:<kind>"); ids get "-s<j>".

    MC's failure modes (module docstring; `WorldConfig` holds their shares, all 0 draws nothing
    more, so the same seed gives the same solutions as without them): with probability
    `check_rate` a solution carries one check step after one of its steps before the last (half of
    the erroneous ones: a wrong check, their only error; "+check" / "toy-error:wrong_check"); a
    solution whose injected error sits before its last step starts again after it with probability
    `restart_rate` ("+restart"); a right solution gets its last step miscomputed with probability
    `slip_rate` ("toy-error:slip")."""
    rng = random.Random(seed)
    out = []
    for problem in problems:
        world = world_of(problem)
        n_ops = len(world["ops"])
        for j in range(per_problem):
            steps, generator, error_at = None, "toy-reference", None
            check_after = rng.randrange(n_ops - 1) if check_rate and n_ops > 1 and rng.random() < check_rate else None
            if rng.random() < error_rate:
                if check_after is not None and rng.random() < 0.5:
                    steps = _with_check(world, write_solution(world), check_after, wrong=True)
                    generator = f"toy-error:{CHECK_KIND}" if steps else generator
                    check_after = None
                if steps is None:
                    options = [(k, s) for k in kinds for s in range(n_ops)]
                    rng.shuffle(options)
                    for kind, step in options:
                        steps = inject_error(world, kind, step, rng)
                        if steps is not None:
                            generator, error_at = f"toy-error:{kind}", step
                            break
            if steps is None:
                steps = write_solution(world)
                if slip_rate and rng.random() < slip_rate:
                    steps = inject_error(world, "arithmetic", n_ops - 1, rng) or steps
                    generator = "toy-error:slip" if steps != write_solution(world) else generator
            if error_at is not None and error_at < n_ops - 1 and restart_rate and rng.random() < restart_rate:
                steps = steps[:error_at + 1] + restart_steps(world)
                generator += "+restart"
            if check_after is not None and (error_at is None or check_after < error_at):
                steps = _with_check(world, steps, check_after, wrong=False) or steps
                generator += "+check"
            out.append(solution_record(problem, steps, generator, f"-s{j}"))
    return out


def _with_check(world: Mapping[str, Any], steps: list[str], after: int, wrong: bool) -> list[str] | None:
    """`steps` with a check inserted after step `after` (a right step applying operation `after`)."""
    values, (op, b) = running_values(world), world["ops"][after]
    check = check_text(values[after + 1], op, b, wrong)
    return None if check is None else steps[:after + 1] + [check] + steps[after + 1:]


def processbench_record(solution: Mapping[str, Any]) -> dict[str, Any] | None:
    """A solution record as a ProcessBench sample {"id","generator","problem","steps",
    "final_answer_correct","label"} with its true label (the world key is kept); None for an empty
    solution, which has no label."""
    verdict = check_steps(solution, solution["steps"])
    if verdict.first_error is None:
        return None
    return {**solution, "generator": solution.get("generator", "unknown"),
            "final_answer_correct": verdict.final_answer_correct, "label": verdict.first_error}


def chat_messages(problem: str, steps: Sequence[str] | None = None,
                  system_prompt: str | None = None) -> list[dict[str, str]]:
    """ChatML messages for a policy example: [system], user = problem, [assistant = steps].
    The default system prompt is the project's CoT prompt (prm_jax.data.prm_format)."""
    from prm_jax.data.prm_format import DEFAULT_SYSTEM_PROMPT

    system_prompt = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": problem})
    if steps is not None:
        messages.append({"role": "assistant", "content": join_steps(steps)})
    return messages


def render_chat(messages: Sequence[Mapping[str, str]]) -> str:
    """ChatML text exactly as prm_jax.toyworld.tokenizer.CHAT_TEMPLATE renders it (no generation prompt)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def tokenizer_corpus(n: int = 400, seed: int = 0, cfg: WorldConfig = WorldConfig(),
                     extra_texts: Iterable[str] = ()) -> list[str]:
    """Texts to train the toy tokenizer on: every phrasing, name, item and operation; reference and
    erroneous solutions, rendered in ChatML with the system
    prompt. Add the judge prompt (and any other fixed text) through `extra_texts`."""
    problems = generate_problems(n, seed, cfg, id_prefix="corpus")
    texts = []
    for sol in sample_solutions(problems, seed=seed, error_rate=0.3):
        texts.append(render_chat(chat_messages(sol["problem"], sol["steps"])))
    # Every surface form at least once, whatever the sample drew.
    for op, phrases in OP_PHRASES.items():
        for k in range(len(phrases)):
            for name, _ in NAMES:
                for singular, plural in ITEMS:
                    world = {"start": 12, "ops": [[op, 2], ["+", 1], ["-", 1]], "name": name, "item": plural,
                             "phrasing": [k, 0, 0]}
                    texts.append(render_problem(world) + f" {singular}")
    texts.extend(extra_texts)
    return texts


def failure_shares(cfg) -> dict[str, float]:
    """The WorldConfig's shares of MC's failure modes, as `world.sample_solutions` takes them."""
    return {k: getattr(cfg, k) for k in ("restart_rate", "check_rate", "slip_rate")}
