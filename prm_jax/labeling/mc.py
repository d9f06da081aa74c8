"""Monte-Carlo step labels: from each step prefix of a solution, let the policy finish N times
and count how many continuations reach the gold answer.

Record (DESIGN.md, plus bookkeeping):
    mc = {"n": N, "correct": [count or null per step], "first_error": int,
          "mode": "all" | "first-error" | "binary", "threshold": t, "rollouts": rollouts spent}
Step i is a hard positive iff correct[i] > threshold (default 0: one success is enough, the
paper's choice); its soft label is correct[i] / N. first_error is the first hard-negative step,
-1 if there is none.

Modes (K steps):
- "all": every step is evaluated (K * N rollouts). first_error = first hard negative.
- "first-error": steps are evaluated in order and evaluation stops at the first hard negative;
  later steps have correct = null. Same first_error as "all", fewer rollouts on bad solutions.
- "binary": assumes monotonicity (once a prefix is a hard negative, every longer prefix is too)
  and binary-searches the first hard negative: ceil(log2(K + 1)) prefixes at most. Only the
  probed steps get a count; the others are null. Under monotonicity first_error equals the one
  "all" would find; the labels of unprobed steps follow from it (positive before, negative from
  first_error on) — `hard_labels` fills them in that way.

What a rollout "reaches": the final answer of the whole trajectory, i.e. the last answer in
steps[:i+1] + continuation, so a continuation that adds nothing keeps the prefix's answer. The
last prefix of a finished solution (one with a final answer) is the whole trajectory, so it is not
rolled out: its count is N if that answer is right, else 0. Asked to go on past its own final
answer, a policy writes steps it was never trained to write (a toy policy starts a new step and
boxes another number), which would label the last step of a right solution wrong.

The policy is any callable `policy(requests, n) -> [n completion texts per request]`, so tests
can script it; `SamplerPolicy` is the real one on top of `prm_jax.sampling.sampler`.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from prm_jax import grading
from prm_jax.data.prm_format import DEFAULT_SYSTEM_PROMPT
from prm_jax.data.steps import STEP_SEPARATOR, join_steps, policy_prompt_ids, rollout_prefix_ids
from prm_jax.errors import InputError
from prm_jax.sampling.ids import default_stop_ids, stable_key_id

MODES = ("all", "first-error", "binary")


@dataclasses.dataclass(frozen=True)
class RolloutRequest:
    """Continue `problem`'s solution after `steps` (= the full solution's steps[:i+1])."""
    key: str  # "<solution id>/<step index>", unique within a call
    problem: str
    steps: tuple[str, ...]


Policy = Callable[[Sequence[RolloutRequest], int], list[list[str]]]
GradeFn = Callable[[list[str | None], list[str]], list[bool]]


@dataclasses.dataclass(frozen=True)
class MCConfig:
    n: int = 8
    threshold: int = 0
    mode: str = "all"
    max_prefixes: int = 64  # prefixes per policy call (its batch is max_prefixes * n rollouts)

    def __post_init__(self):
        if self.mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.n < 1:
            raise InputError(f"n must be >= 1, got {self.n}")
        if not 0 <= self.threshold < self.n:
            raise InputError(f"threshold must be in [0, n) = [0, {self.n}), got {self.threshold}")


def max_probes(num_steps: int, mode: str) -> int:
    """Most prefixes a mode evaluates for a solution of `num_steps` steps."""
    if mode == "binary":
        return math.ceil(math.log2(num_steps + 1))
    return num_steps


@dataclasses.dataclass
class _Search:
    """Per-solution state: which step to probe next, and what is known."""
    k: int
    mode: str
    counts: list[int | None]
    lo: int = 0  # binary: first_error lies in [lo, hi]; hi == k means "no error"
    hi: int = 0
    next_step: int = 0  # first-error mode
    first_error: int | None = None

    def probes(self) -> list[int]:
        if self.first_error is not None:
            return []
        if self.mode == "all":
            return [i for i in range(self.k) if self.counts[i] is None]
        if self.mode == "first-error":
            return [self.next_step]
        return [(self.lo + self.hi) // 2]

    def update(self, step: int, negative: bool) -> None:
        if self.mode == "all":
            if all(c is not None for c in self.counts):
                self.first_error = -1  # provisional; finish() computes the real one
        elif self.mode == "first-error":
            if negative:
                self.first_error = step
            elif step + 1 == self.k:
                self.first_error = -1
            else:
                self.next_step = step + 1
        else:
            if negative:
                self.hi = step
            else:
                self.lo = step + 1
            if self.lo >= self.hi:
                self.first_error = self.lo if self.lo < self.k else -1


def label_solutions(solutions: Sequence[dict[str, Any]], policy: Policy, cfg: MCConfig = MCConfig(),
                    grade: GradeFn | None = None) -> list[dict[str, Any]]:
    """The `mc` dict for each solution record (keys used: id, problem, answer, steps).

    All solutions advance together, one round of probes at a time, so every policy call batches
    prefixes across solutions (mode "all" needs a single round)."""
    grade = grade or grading.grade_many
    # A finished solution's final answer: its last prefix is the whole trajectory, not rolled out.
    finals = [grading.extract_answer(join_steps(sol["steps"])) for sol in solutions]
    states = []
    for sol in solutions:
        k = len(sol["steps"])
        st = _Search(k=k, mode=cfg.mode, counts=[None] * k, hi=k)
        if k == 0:
            st.first_error = -1
        states.append(st)
    while True:
        todo = [(j, i) for j, st in enumerate(states) for i in st.probes()]
        if not todo:
            break
        counts = _count_correct(solutions, finals, todo, policy, cfg, grade)
        for (j, i), c in zip(todo, counts):
            states[j].counts[i] = c
        for (j, i), c in zip(todo, counts):
            states[j].update(i, c <= cfg.threshold)
    out = []
    for final, st in zip(finals, states):
        # every evaluated prefix was rolled out but a finished solution's last one
        rolled = sum(c is not None for c in st.counts) - (final is not None and st.counts[-1] is not None)
        fe = st.first_error
        if cfg.mode == "all":
            fe = next((i for i, c in enumerate(st.counts) if c <= cfg.threshold), -1)
        out.append({"n": cfg.n, "correct": st.counts, "first_error": fe, "mode": cfg.mode,
                    "threshold": cfg.threshold, "rollouts": rolled * cfg.n})
    return out


def _count_correct(solutions, finals, todo, policy: Policy, cfg: MCConfig, grade: GradeFn) -> list[int]:
    """Run N rollouts for each (solution index, step index) and count those reaching the gold; the
    last step of a finished solution (finals[j] not None) counts its own answer instead."""
    counts: list[int] = []
    for start in range(0, len(todo), cfg.max_prefixes):
        chunk = todo[start:start + cfg.max_prefixes]
        finished = [finals[j] if i == len(solutions[j]["steps"]) - 1 else None for j, i in chunk]
        rolled = [(j, i) for (j, i), answer in zip(chunk, finished) if answer is None]
        requests = [RolloutRequest(f"{solutions[j]['id']}/{i}", solutions[j]["problem"],
                                   tuple(solutions[j]["steps"][:i + 1])) for j, i in rolled]
        completions = policy(requests, cfg.n) if requests else []
        if len(completions) != len(requests) or any(len(c) != cfg.n for c in completions):
            raise ValueError(f"policy returned {[len(c) for c in completions]} completions for "
                             f"{len(requests)} requests of n={cfg.n}")
        preds, golds = [], []
        for req, (j, _), outs in zip(requests, rolled, completions):
            head = join_steps(req.steps) + STEP_SEPARATOR
            for text in outs:
                preds.append(grading.extract_answer(head + text))
                golds.append(str(solutions[j]["answer"]))
        for (j, _), answer in zip(chunk, finished):
            if answer is not None:
                preds.append(answer)
                golds.append(str(solutions[j]["answer"]))
        ok = grade(preds, golds)
        rolled_counts = iter(sum(ok[r * cfg.n:(r + 1) * cfg.n]) for r in range(len(rolled)))
        finished_ok = iter(ok[len(rolled) * cfg.n:])
        counts.extend(next(rolled_counts) if answer is None else cfg.n * int(next(finished_ok))
                      for answer in finished)
    return counts


# ---------------------------------------------------------------------------------------------
# Labels from an mc record
# ---------------------------------------------------------------------------------------------


def hard_labels(mc: dict[str, Any], threshold: int | None = None) -> list[int]:
    """1/0 per step: count > threshold where evaluated; unevaluated steps (first-error and binary
    modes) take the label monotonicity implies: 1 before first_error, 0 from it on."""
    t = mc.get("threshold", 0) if threshold is None else threshold
    fe = mc["first_error"]
    labels = []
    for i, c in enumerate(mc["correct"]):
        if c is not None:
            labels.append(int(c > t))
        else:
            labels.append(int(fe == -1 or i < fe))
    return labels


def soft_labels(mc: dict[str, Any]) -> list[float | None]:
    """correct / n per step; None where the step was not evaluated."""
    return [None if c is None else c / mc["n"] for c in mc["correct"]]


# ---------------------------------------------------------------------------------------------
# The real policy: the JAX sampler
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SamplerPolicy:
    """`Policy` on top of `prm_jax.sampling.sampler.generate_from_prefixes`: each request's
    prefix (chat prompt + steps + "\\n\\n", see data.steps) is prefilled once and continued
    n times. Rollout j of request "sid/i" draws from the random stream (seed, stable_key_id(key), j)
    (the sampler's key_ids/sample_ids), so it does not depend on batching: a resumed or
    re-batched run draws the same samples."""
    model: Any
    tokenizer: Any
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 0
    seed: int = 0
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    stop_ids: Sequence[int] | None = None
    mesh: Any = None
    tokens_generated: int = 0

    def __post_init__(self):
        if self.stop_ids is None:
            self.stop_ids = default_stop_ids(self.tokenizer)
        self._prompt_cache: dict[tuple[str, str | None], list[int]] = {}

    def prefix_ids(self, req: RolloutRequest) -> list[int]:
        key = (req.problem, self.system_prompt)
        if key not in self._prompt_cache:
            if len(self._prompt_cache) > 4096:
                self._prompt_cache.clear()
            self._prompt_cache[key] = policy_prompt_ids(self.tokenizer, req.problem, self.system_prompt)
        return rollout_prefix_ids(self.tokenizer, req.problem, list(req.steps), len(req.steps) - 1,
                                  self.system_prompt, prompt=self._prompt_cache[key])

    def __call__(self, requests: Sequence[RolloutRequest], n: int) -> list[list[str]]:
        from prm_jax.sampling.sampler import generate_from_prefixes

        prefixes = [self.prefix_ids(r) for r in requests]
        outs = generate_from_prefixes(self.model, prefixes, n, self.max_new_tokens, temperature=self.temperature,
                                      top_p=self.top_p, top_k=self.top_k, seed=self.seed,
                                      stop_ids=list(self.stop_ids), mesh=self.mesh,
                                      key_ids=[stable_key_id(r.key) for r in requests])
        texts = []
        for per_prefix in outs:
            self.tokens_generated += sum(len(ids) for ids in per_prefix)
            texts.append([self.tokenizer.decode(ids, skip_special_tokens=True) for ids in per_prefix])
        return texts
