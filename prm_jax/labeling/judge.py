"""LLM judge: the critique prompt, the verdict parser, majority voting, and the judging loop.

A judge reads a problem and its numbered steps and names the first wrong step. Templates are
plain files with YAML front matter (see judge_templates/default.txt); the front matter fixes the
step numbering base and which reply style is read first. Two reply styles are understood:

- per-paragraph analyses (`<analysis_k>` ... `</analysis_k>`) ending in
  `<conclusion>Correct|Incorrect</conclusion>` (rules in `_read_conclusion`): a verdict needs its
  conclusion and an analysis of every step it speaks for;
- a paragraph index in the last `\\boxed{k}` (-1 = no wrong paragraph), as ProcessBench's critic prompt.

`parse_verdict` returns the 0-based first error, -1 for "all correct", or None when the reply
cannot be read. None is never turned into -1: consensus filtering drops such records, and
`majority_vote` lets no verdict win on a minority of readable replies.

`judge_file` runs the whole stage: it renders prompts, answers what it can from an on-disk reply
cache, sends the rest through a client (judge_clients.py) with bounded concurrency, and writes
each finished record at once through a ResumableWriter, so a killed run resumes where it stopped
and a rerun of a finished set sends no request at all.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import hashlib
import importlib.resources
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import yaml
from tqdm import tqdm

from prm_jax.errors import InputError
from prm_jax.grading import last_boxed
from prm_jax.labeling.solutions import Solution
from prm_jax.records import ResumableWriter, iter_lines, write_jsonl

VERDICT_STYLES = ("conclusion", "boxed", "auto")
# A kill -9 loses nothing that os.write returned from (the page cache outlives the process); fsync
# only guards against power loss, and each one stalls the event loop for milliseconds.
FSYNC_EVERY = 1024


# --------------------------------------------------------------------------- template

@dataclasses.dataclass(frozen=True)
class JudgeTemplate:
    body: str                      # user message with {problem} and {steps}
    index_base: int = 1            # number shown for the first step
    verdict: str = "conclusion"    # which reply style is read first
    paragraph: str = "<paragraph_{index}>\n{text}\n</paragraph_{index}>"
    joiner: str = "\n\n"
    system: str | None = None
    source: str = "<string>"

    def __post_init__(self):
        if self.verdict not in VERDICT_STYLES:
            raise InputError(f"{self.source}: verdict must be one of {VERDICT_STYLES}, got {self.verdict!r}")
        if self.index_base not in (0, 1):
            raise InputError(f"{self.source}: index_base must be 0 or 1, got {self.index_base!r}")
        for field in ("{problem}", "{steps}"):
            if field not in self.body:
                raise InputError(f"{self.source}: template body lacks the {field} placeholder")

    def render_steps(self, steps: Sequence[str]) -> str:
        return self.joiner.join(_fill(self.paragraph, index=str(i + self.index_base), text=s)
                                for i, s in enumerate(steps))

    def messages(self, problem: str, steps: Sequence[str]) -> list[dict[str, str]]:
        """The chat messages for one solution (system message only when the template has one)."""
        user = _fill(self.body, problem=problem, steps=self.render_steps(steps))
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs.append({"role": "user", "content": user})
        return msgs


def _fill(template: str, /, **values: str) -> str:
    """Replace {name} for the given names in one pass: braces elsewhere (LaTeX) and braces inside
    the inserted values are left alone, unlike str.format."""
    return _placeholders(tuple(values)).sub(lambda m: values[m.group(1)], template)


@functools.lru_cache(maxsize=16)
def _placeholders(names: tuple[str, ...]) -> re.Pattern:
    return re.compile(r"\{(" + "|".join(map(re.escape, names)) + r")\}")


def parse_template(text: str, source: str = "<string>") -> JudgeTemplate:
    """A template file: optional YAML front matter between `---` lines, then the user message."""
    meta: dict[str, Any] = {}
    if text.startswith("---"):
        parts = re.split(r"^---[ \t]*$", text, maxsplit=2, flags=re.M)
        if len(parts) != 3:
            raise InputError(f"{source}: front matter opened with '---' but never closed")
        try:
            meta = yaml.safe_load(parts[1]) or {}
        except yaml.YAMLError as e:
            raise InputError(f"{source}: bad YAML front matter ({e})") from None
        if not isinstance(meta, dict):
            raise InputError(f"{source}: front matter should be a mapping")
        text = parts[2]
    known = {f.name for f in dataclasses.fields(JudgeTemplate)} - {"body", "source"}
    unknown = set(meta) - known
    if unknown:
        raise InputError(f"{source}: unknown front-matter keys {sorted(unknown)}; expected some of {sorted(known)}")
    return JudgeTemplate(body=text.strip("\n"), source=source, **meta)


def load_template(name_or_path: str | os.PathLike = "default") -> JudgeTemplate:
    """A shipped template by name ("default", "boxed") or any template file by path."""
    path = os.fspath(name_or_path)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return parse_template(f.read(), source=path)
    shipped = importlib.resources.files("prm_jax.labeling") / "judge_templates" / f"{path}.txt"
    if not shipped.is_file():
        raise FileNotFoundError(f"judge template {path!r}: no such file and no shipped template of that name")
    return parse_template(shipped.read_text(encoding="utf-8"), source=f"judge_templates/{path}.txt")


# --------------------------------------------------------------------------- parser

_THINK_OPEN = re.compile(r"<think>", re.I)
_THINK_END = re.compile(r"</think>", re.I)
_CONCLUSION = re.compile(r"<conclusion>\s*\**\s*(.*?)\s*\**\s*</conclusion>", re.I | re.S)
# Whole tags only: `<analysis_3>`, never `<paragraph_3>` (a critique quotes the solution's tags)
# nor a bare `analysis_3`.
_ANALYSIS_OPEN = re.compile(r"<analysis_(\d+)>", re.I)
_ANALYSIS_CLOSE = "</analysis_{}>"
_CONCLUSION_STYLE = re.compile(r"</?(?:analysis_\d+|conclusion)>", re.I)
# How an analysis calls its step wrong: the verdict words the default template asks for
# ("decide whether it is correct"), as the fixture's and the toy critic's critiques write them.
_CALLS_INCORRECT = re.compile(r"\bincorrect\b|(?:\bnot|n't)\s+correct\b", re.I)
_INT = re.compile(r"[+-]?\d+")


def _from_index(k: int, n_steps: int, base: int) -> int | None:
    if k == -1:
        return -1
    idx = k - base
    return idx if 0 <= idx < n_steps else None


def _read_boxed(reply: str, n_steps: int, base: int) -> int | None:
    content = last_boxed(reply)
    if content is None:
        return None
    content = re.sub(r"\\text\{([^{}]*)\}", r"\1", content).strip().strip("$").strip()
    if not _INT.fullmatch(content):
        return None
    return _from_index(int(content), n_steps, base)


def _analyses(text: str) -> list[tuple[int, str]]:
    """(k, body) for each `<analysis_k>` in order. A body runs to its `</analysis_k>`, or, when
    the judge left it open, to the next `<analysis_j>` (or the end of `text`)."""
    opens = list(_ANALYSIS_OPEN.finditer(text))
    out = []
    for m, nxt in zip(opens, opens[1:] + [None]):
        body = text[m.end(): nxt.start() if nxt else len(text)]
        close = body.lower().find(_ANALYSIS_CLOSE.format(m.group(1)))
        out.append((int(m.group(1)), body if close < 0 else body[:close]))
    return out


def _read_conclusion(reply: str, n_steps: int, base: int) -> int | None:
    """The verdict of a per-paragraph critique, or None. Only the text before the last
    `<conclusion>` counts as analyses. Rules (n steps numbered base..base+n-1):

    - no `<conclusion>`, or a word other than Correct/Incorrect in it: None;
    - the analysed indices must be exactly base..last, where last is the index of the final
      `<analysis_k>` (every step up to the one the verdict is about, nothing past it; repeats are
      allowed): a reply that skipped a step, or analysed none, checked nothing it could vouch for;
    - an analysis "calls its step incorrect" when its body has the word "incorrect" or
      "not correct"/"n't correct" (case-insensitive, whole words);
    - Correct: last must be the final step and no analysis may call its step incorrect (else the
      reply contradicts itself) -> -1;
    - Incorrect: the final analysis names the first wrong step, last - base; an earlier analysis
      that already called its step incorrect (the template says to stop there) makes the first
      error ambiguous -> None. The final analysis's own wording is not checked (it may say "wrong").
    """
    found = list(_CONCLUSION.finditer(reply))
    if not found:
        return None
    word = found[-1].group(1).strip().strip(".*").strip().lower()
    if word not in ("correct", "incorrect"):
        return None
    analyses = _analyses(reply[: found[-1].start()])
    if not analyses:
        return None
    last = analyses[-1][0]
    if {k for k, _ in analyses} != set(range(base, last + 1)):
        return None
    called_incorrect = {k for k, body in analyses if _CALLS_INCORRECT.search(body)}
    if word == "correct":
        return -1 if last == base + n_steps - 1 and not called_incorrect else None
    if called_incorrect - {last}:
        return None
    return _from_index(last, n_steps, base)


def parse_verdict(reply: str | None, n_steps: int, index_base: int = 1, style: str = "auto") -> int | None:
    """The 0-based first wrong step named by `reply`, -1 if none, None if it cannot be told.

    A closed `<think>...</think>` block is a reasoning model's hidden draft: only the text after
    the last `</think>` is read. A `<think>` still open there means the reply was cut off while
    thinking: None, whatever the draft says.

    `style` picks the readers: "conclusion" reads only the <conclusion> style (a critique may quote
    the solution's own \\boxed{answer}, so \\boxed{} is never its fallback); "auto" reads a reply
    with any <analysis_k>/<conclusion> tag as that style and any other by its last \\boxed{};
    "boxed" (ProcessBench's critic) tries the last \\boxed{} first, then the conclusion style.
    An index outside the solution's steps is None, never clipped."""
    if not reply or n_steps <= 0:
        return None
    ends = [m.end() for m in _THINK_END.finditer(reply)]
    if ends:
        reply = reply[ends[-1]:]
    if _THINK_OPEN.search(reply):
        return None
    if style == "boxed":
        readers = (_read_boxed, _read_conclusion)
    elif style == "conclusion" or _CONCLUSION_STYLE.search(reply):
        readers = (_read_conclusion,)
    else:
        readers = (_read_boxed,)
    for read in readers:
        verdict = read(reply, n_steps, index_base)
        if verdict is not None:
            return verdict
    return None


def majority_vote(verdicts: Sequence[int | None]) -> int | None:
    """The verdict of several samples, or None. A verdict needs more than half of all samples to
    be readable AND more than half of the readable ones to name it: a lone readable reply among
    unreadable ones never decides, and ties are None. One sample decides alone when it parsed."""
    parsed = [v for v in verdicts if v is not None]
    if 2 * len(parsed) <= len(verdicts):
        return None
    top, n = collections.Counter(parsed).most_common(1)[0]
    return top if 2 * n > len(parsed) else None


# --------------------------------------------------------------------------- cache

def cache_key(model: str, messages: list[dict[str, str]], sampling: dict[str, Any], sample: int) -> str:
    """sha256 over everything that determines a reply: model, prompt, sampling params, sample index."""
    blob = json.dumps([model, messages, sampling, sample], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ReplyCache:
    """Append-only JSONL of replies keyed by `cache_key`; a kill leaves at most a torn last line,
    which ResumableWriter cuts on reopen."""

    def __init__(self, path: str):
        self.writer = ResumableWriter(path, key="key", fsync_every=FSYNC_EVERY)
        self.replies: dict[str, dict[str, Any]] = {}
        if self.writer.resumed:
            for line in iter_lines(path):
                self.replies[line.get("key", str)] = line.record

    def get(self, key: str) -> dict[str, Any] | None:
        return self.replies.get(key)

    def put(self, key: str, text: str, prompt_tokens: int, completion_tokens: int) -> None:
        entry = {"key": key, "text": text, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        self.replies[key] = entry
        self.writer.write(entry)

    def close(self) -> None:
        self.writer.close()


# --------------------------------------------------------------------------- judging loop

@dataclasses.dataclass
class JudgeSummary:
    total: int = 0
    resumed: int = 0          # already in the output before this run
    judged: int = 0           # written by this run
    unparsed: int = 0         # written with first_error = null
    failed: int = 0           # no reply after all retries (listed in the failed file, not written)
    cache_hits: int = 0
    requests: int = 0
    retries: int = 0
    request_failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        rate = self.judged / self.seconds if self.seconds > 0 else 0.0
        return [
            f"records: {self.total} total, {self.resumed} already done, {self.judged} judged "
            f"({self.unparsed} unparsed verdicts), {self.failed} failed",
            f"requests: {self.requests} sent, {self.retries} retries, {self.request_failures} failed, "
            f"{self.cache_hits} replies from cache",
            f"tokens: {self.prompt_tokens} prompt, {self.completion_tokens} completion; "
            f"{self.seconds:.1f} s, {rate:.1f} records/s",
        ]


def judge_record(record: dict[str, Any], replies: list[str], model: str, template: JudgeTemplate) -> dict[str, Any]:
    """The judge-labelled record: the input record plus `judge` (votes only with several samples)."""
    n = len(record["steps"])
    verdicts = [parse_verdict(r, n, template.index_base, template.verdict) for r in replies]
    first_error = majority_vote(verdicts)
    judge: dict[str, Any] = {"first_error": first_error, "model": model}
    if len(replies) == 1:
        judge["raw"] = replies[0]
    else:
        # raw = a reply that voted for the outcome (the first one if no outcome).
        pick = next((i for i, v in enumerate(verdicts) if v == first_error and v is not None), 0)
        judge["raw"] = replies[pick]
        judge["votes"] = verdicts
    return {**record, "judge": judge}


async def judge_solutions(
    solutions: Sequence[Solution],
    client,
    *,
    out_path: str,
    template: JudgeTemplate,
    model: str,
    samples: int = 1,
    cache_path: str | None = None,
    failed_path: str | None = None,
    batch_size: int = 1,
    progress: bool = True,
    on_write: Callable[[dict[str, Any]], None] | None = None,
) -> JudgeSummary:
    """Judge every solution not yet in `out_path`; see the module docstring.

    `client` has `async complete(list_of_messages) -> list[Reply]`, `concurrency` and `counters`
    (judge_clients.py). Records whose requests all fail are listed in `failed_path` with the error
    and left out of the output, so the next run retries them."""
    if samples < 1:
        raise InputError(f"samples must be >= 1, got {samples}")
    loop_start = time.perf_counter()
    cache_path = cache_path or f"{out_path}.cache.jsonl"
    failed_path = failed_path or f"{out_path}.failed.jsonl"
    summary = JudgeSummary(total=len(solutions))
    writer = ResumableWriter(out_path, key="id", fsync_every=FSYNC_EVERY)
    try:
        cache = ReplyCache(cache_path)
    except BaseException:  # e.g. the cache held by another run: free the output's lock at once
        writer.close()
        raise
    sampling = client.sampling_dict()
    todo = [s for s in solutions if s.id not in writer.done]
    summary.resumed = len(solutions) - len(todo)
    replies: dict[int, list[str | None]] = {i: [None] * samples for i in range(len(todo))}
    remaining = [samples] * len(todo)
    failures: dict[int, str] = {}
    messages: dict[int, list[dict[str, str]]] = {}
    bar = tqdm(total=len(todo), desc="judge", unit="rec", disable=not progress, dynamic_ncols=True)

    def finish(i: int) -> None:
        if i in failures:
            summary.failed += 1
        else:
            rec = judge_record(todo[i].record, replies[i], model, template)
            if writer.write(rec):
                summary.judged += 1
                summary.unparsed += rec["judge"]["first_error"] is None
                if on_write is not None:
                    on_write(rec)
        del replies[i], messages[i]
        bar.update(1)

    def settle(i: int) -> None:
        remaining[i] -= 1
        if remaining[i] == 0:
            finish(i)

    # Work units are (solution, sample) pairs. Prompts are rendered and looked up in the cache by the
    # workers as they go, so requests start at once instead of after a pass over the whole set.
    units = collections.deque((i, k) for i in range(len(todo)) for k in range(samples))

    async def worker() -> None:
        while units:
            batch = []
            while units and len(batch) < batch_size:
                i, k = units.popleft()
                if i not in messages:
                    messages[i] = template.messages(todo[i].record["problem"], todo[i].record["steps"])
                key = cache_key(model, messages[i], sampling, k)
                hit = cache.get(key)
                if hit is None:
                    batch.append((i, k, key))
                    continue
                replies[i][k] = hit["text"]
                summary.cache_hits += 1
                settle(i)
            if not batch:
                continue
            try:
                results = await client.complete([messages[i] for i, _, _ in batch])
            except Exception as e:  # noqa: BLE001 - every failure is recorded, none is lost
                results = [e] * len(batch)
            for (i, k, key), res in zip(batch, results):
                if isinstance(res, Exception):
                    failures.setdefault(i, f"{type(res).__name__}: {res}")
                else:
                    cache.put(key, res.text, res.prompt_tokens, res.completion_tokens)
                    replies[i][k] = res.text
                settle(i)

    try:
        n_workers = max(1, min(client.concurrency, len(units)))
        await asyncio.gather(*(worker() for _ in range(n_workers)))
    finally:
        bar.close()
        writer.close()
        cache.close()
        c = client.counters
        summary.requests, summary.retries, summary.request_failures = c.requests, c.retries, c.failures
        summary.prompt_tokens, summary.completion_tokens = c.prompt_tokens, c.completion_tokens
        summary.seconds = time.perf_counter() - loop_start
    failed_rows = [{"id": todo[i].id, "where": todo[i].where, "error": err} for i, err in sorted(failures.items())]
    if failed_rows:
        write_jsonl(failed_path, failed_rows)
    elif os.path.exists(failed_path):
        os.remove(failed_path)  # a stale list from an earlier run: those records are done now
    return summary
