"""Final answers: extraction from a solution text and equivalence with the gold answer.

Extraction takes, in order of preference, the content of the last `\\boxed{...}` / `\\fbox{...}`
(nested braces kept), the last "The (final) answer is ..." phrase, or GSM8K's "#### x".

Equivalence asks math-verify (`parse` + `verify`, symbolic and numeric) and falls back to a
normalised-string / numeric comparison when math-verify errors or runs out of time. math-verify
bounds its work with SIGALRM, which only works in a process's main thread; `grade_many` therefore
runs it in a process pool (forkserver/spawn context: the parent may hold JAX threads, so no fork)
where each item runs in the worker's main thread under our own alarm, and the parent keeps a
second deadline in case a worker is stuck in C code. This module must not import JAX: the pool
workers import it.
"""
from __future__ import annotations

import atexit
import concurrent.futures as cf
import logging
import math
import multiprocessing
import re
import signal
import threading
import time
from collections.abc import Sequence
from fractions import Fraction

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0  # seconds of math-verify work per item

# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")
_ANSWER_IS_RE = re.compile(r"(?:final answer|the answer)\s*(?:is\s*:?|:)\s*", re.IGNORECASE)
_GSM8K_RE = re.compile(r"####\s*(.+)")


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the brace group opening at text[start] == '{' and the index after it
    (escaped braces `\\{`, `\\}` are content)."""
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last non-empty `\\boxed{...}` or `\\fbox{...}` (also `\\boxed 5`), or None."""
    for m in reversed(list(_BOX_RE.finditer(text))):
        j = m.end()
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            got = _braced(text, j)
            if got is not None and got[0].strip():  # an empty `\boxed{}` (prompt echo) is no answer
                return got[0].strip()
        elif j > m.end():  # `\boxed 5`: the next whitespace-free token
            tok = re.match(r"[^\s$]+", text[j:])
            if tok:
                return tok.group(0).rstrip(".").strip()
    return None


def _answer_phrase(text: str) -> str | None:
    matches = list(_ANSWER_IS_RE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end():].strip()
    if rest.startswith("$"):  # "$...$" or "$$...$$"
        fence = "$$" if rest.startswith("$$") else "$"
        end = rest.find(fence, len(fence))
        if end > 0:
            return rest[len(fence):end].strip() or None
    line = rest.split("\n", 1)[0].strip()
    line = re.sub(r"\.\s*$", "", line)  # a sentence-ending period, not a decimal point
    return line or None


def extract_answer(text: str | None) -> str | None:
    """The final answer of a solution text as written (not normalised), or None if it has none."""
    if not text:
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    phrase = _answer_phrase(text)
    if phrase is not None:
        return last_boxed(phrase) or phrase
    hashes = _GSM8K_RE.findall(text)
    if hashes:
        return hashes[-1].strip() or None
    return None


# ---------------------------------------------------------------------------------------------
# Normalisation and the cheap fallback comparison
# ---------------------------------------------------------------------------------------------

_UNITS = (
    "degrees", "degree", "cm", "centimeters", "meters", "meter", "m", "km", "kilometers", "inches", "inch",
    "feet", "foot", "ft", "miles", "mile", "units", "unit", "square", "sq", "dollars", "dollar", "cents",
    "cent", "hours", "hour", "minutes", "minute", "seconds", "second", "days", "day", "years", "year",
    "mph", "pounds", "pound", "kg", "grams", "gram", "liters", "liter", "percent",
)
_UNIT_RE = re.compile(r"(?<=\d)\s*(?:\\(?:text|mbox|mathrm)\{\s*)?(?:%s)\}?(?:\^\{?[23]\}?)?\s*$" % "|".join(_UNITS))


def _strip_command(s: str, cmd: str) -> str:
    """Replace `\\cmd{x}` by `x` everywhere (nested braces respected)."""
    out, i, key = [], 0, "\\" + cmd + "{"
    while True:
        j = s.find(key, i)
        if j < 0:
            out.append(s[i:])
            return "".join(out)
        got = _braced(s, j + len(key) - 1)
        if got is None:
            out.append(s[i:])
            return "".join(out)
        out.append(s[i:j])
        out.append(got[0])
        i = got[1]


def normalize_answer(ans: str | None) -> str:
    """A canonical string form: no $, \\text{}, \\left/\\right, spaces, units, thousands commas,
    trailing period; \\dfrac/\\tfrac -> \\frac, `\\frac12` -> `\\frac{1}{2}`, `x = 3` -> `3`."""
    if ans is None:
        return ""
    s = str(ans).strip()
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "")
    s = s.replace("\\%", "").replace("%", "")
    s = _UNIT_RE.sub("", s)
    for cmd in ("text", "textbf", "mbox", "mathrm", "boxed"):
        s = _strip_command(s, cmd)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 3" -> "3" (single variable only)
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)  # thousands separators
    s = s.replace(" ", "").rstrip(".")
    if s.startswith("(") and s.endswith(")") and re.fullmatch(r"\([A-Ea-e]\)", s):
        s = s[1:-1]  # multiple choice "(C)" -> "C"
    return s


_NUM_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def to_number(s: str) -> float | None:
    """A normalised answer as a number if it is a plain number, a/b, or \\frac{a}{b}; else None."""
    s = s.strip()
    sign = 1.0
    if s.startswith("-"):
        sign, s = -1.0, s[1:].strip()
    m = re.fullmatch(r"\\frac\{(.+?)\}\{(.+?)\}", s) or re.fullmatch(r"(\S+?)/(\S+)", s)
    if m:
        a, b = to_number(m.group(1)), to_number(m.group(2))
        if a is None or b is None or b == 0:
            return None
        return sign * a / b
    if _NUM_RE.fullmatch(s):
        try:
            return sign * float(Fraction(s)) if "e" not in s.lower() else sign * float(s)
        except (ValueError, ZeroDivisionError):
            return None
    return None


def fallback_equivalent(pred: str | None, gold: str | None) -> bool:
    """Normalised string equality, or numeric equality (relative tolerance 1e-6)."""
    if pred is None or gold is None:
        return False
    p, g = normalize_answer(pred), normalize_answer(gold)
    if not p or not g:
        return False
    if p == g:
        return True
    a, b = to_number(p), to_number(g)
    if a is None or b is None:
        return False
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


# ---------------------------------------------------------------------------------------------
# math-verify
# ---------------------------------------------------------------------------------------------


class _ItemTimeout(BaseException):
    """Raised by our alarm. A BaseException so math-verify's `except Exception` cannot swallow it."""


def _mv_equivalent(pred: str, gold: str) -> bool:
    """math-verify alone (its own signal timeouts disabled: the caller bounds the time)."""
    from math_verify import parse, verify

    g = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    p = parse("\\boxed{" + pred + "}", parsing_timeout=None)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=None))


def _grade_one(pred: str | None, gold: str | None, timeout: float) -> tuple[bool, str]:
    """(equivalent?, how it was decided: "mv" | "fallback" | "timeout" | "error"). Runs math-verify
    under SIGALRM when called in a main thread; elsewhere only the fallback is used."""
    if pred is None or gold is None:
        return False, "fallback"
    if fallback_equivalent(pred, gold):  # cheap and certain: identical after normalisation
        return True, "fallback"
    if threading.current_thread() is not threading.main_thread():
        return False, "fallback"

    def on_alarm(signum, frame):
        raise _ItemTimeout()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(timeout, 1e-6))
    try:
        return _mv_equivalent(pred, gold), "mv"
    except _ItemTimeout:
        return fallback_equivalent(pred, gold), "timeout"
    except Exception:  # noqa: BLE001 — a parser crash means "use the fallback", never a failed job
        return fallback_equivalent(pred, gold), "error"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def is_equivalent(pred: str | None, gold: str | None, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Is the predicted final answer equivalent to the gold one? In-process (main thread:
    math-verify under an alarm; other threads: the fallback comparison only)."""
    return _grade_one(pred, gold, timeout)[0]


def _worker_init() -> None:
    # Import math-verify (sympy, latex2sympy) once per worker, not inside the first item's deadline.
    import math_verify  # noqa: F401

    logging.getLogger("math_verify").setLevel(logging.ERROR)


def _grade_chunk(items: list[tuple[str | None, str | None]], timeout: float) -> list[tuple[bool, str]]:
    return [_grade_one(p, g, timeout) for p, g in items]


class Grader:
    """A process pool grading (pred, gold) pairs with math-verify, a timeout per item and the
    fallback comparison. Reuse one across calls: starting workers costs about a second each.
    workers=0 grades in the calling process instead (math-verify under SIGALRM when that is the
    main thread, else the fallback only): no start-up cost, for small jobs and tests."""

    def __init__(self, workers: int = 2, timeout: float = DEFAULT_TIMEOUT, chunk: int = 16,
                 start_method: str | None = None):
        self.workers = max(0, int(workers))
        self.timeout = float(timeout)
        self.chunk = chunk
        methods = multiprocessing.get_all_start_methods()
        self.start_method = start_method or ("forkserver" if "forkserver" in methods else "spawn")
        self._pool: cf.ProcessPoolExecutor | None = None
        self.stats = {"mv": 0, "fallback": 0, "timeout": 0, "error": 0, "killed": 0}

    def _get_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            ctx = multiprocessing.get_context(self.start_method)
            self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_worker_init)
        return self._pool

    def _kill_pool(self) -> None:
        """Stop a pool with a worker stuck past every deadline (it cannot be interrupted otherwise)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        procs = list(getattr(pool, "_processes", {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.kill()

    def grade_many(self, preds: Sequence[str | None], golds: Sequence[str | None],
                   timeout: float | None = None) -> list[bool]:
        if len(preds) != len(golds):
            raise ValueError(f"grade_many: {len(preds)} predictions but {len(golds)} gold answers")
        timeout = self.timeout if timeout is None else float(timeout)
        results: list[bool | None] = [None] * len(preds)
        todo = []
        for i, (p, g) in enumerate(zip(preds, golds)):
            if p is None or g is None:
                results[i] = False
                self.stats["fallback"] += 1
            elif fallback_equivalent(p, g):
                results[i] = True
                self.stats["fallback"] += 1
            else:
                todo.append(i)
        if not todo:
            return [bool(r) for r in results]
        if self.workers == 0:
            for i in todo:
                results[i], how = _grade_one(preds[i], golds[i], timeout)
                self.stats[how] += 1
            return [bool(r) for r in results]
        pool = self._get_pool()
        chunks = [todo[k:k + self.chunk] for k in range(0, len(todo), self.chunk)]
        futures = {pool.submit(_grade_chunk, [(preds[i], golds[i]) for i in c], timeout): c for c in chunks}
        # Each chunk may need `timeout` per item in the worker; the parent's own backstop adds a
        # grace period for queueing (chunks wait for a free worker) and process start-up.
        per_round = timeout * self.chunk + 30.0
        deadline = time.monotonic() + per_round * (len(chunks) / self.workers + 1)
        stuck = False
        for fut, c in futures.items():
            try:
                got = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except (cf.TimeoutError, cf.process.BrokenProcessPool) as e:
                stuck = True
                log.warning("grading chunk of %d items failed in the pool (%s); using the fallback",
                            len(c), type(e).__name__)
                got = [(fallback_equivalent(preds[i], golds[i]), "killed") for i in c]
            for i, (ok, how) in zip(c, got):
                results[i] = ok
                self.stats[how] += 1
        if stuck:
            self._kill_pool()
        return [bool(r) for r in results]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "Grader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_DEFAULT_GRADERS: dict[int, Grader] = {}


def grade_many(preds: Sequence[str | None], golds: Sequence[str | None], workers: int = 2,
               timeout: float = DEFAULT_TIMEOUT) -> list[bool]:
    """Grade many (pred, gold) final-answer pairs in a process pool (kept alive for later calls
    with the same `workers`, shut down at exit)."""
    grader = _DEFAULT_GRADERS.get(workers)
    if grader is None:
        grader = _DEFAULT_GRADERS[workers] = Grader(workers=workers, timeout=timeout)
    return grader.grade_many(preds, golds, timeout=timeout)


@atexit.register
def _close_default_graders() -> None:
    for g in _DEFAULT_GRADERS.values():
        g.close()
    _DEFAULT_GRADERS.clear()
