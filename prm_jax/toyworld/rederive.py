"""The demo's default judge: a critic that re-derives each step without seeing it.

A critic model that writes a step while the step under review sits in its context copies it (it
blends the step's numbers into its own; experiments/notes/2026-12-07-critic-size-and-judge-ceiling.md).
So this judge never shows it the step it checks: for step k the critic continues the solution's
steps[:k] (assumed right, as ProcessBench's judge assumes everything before the first error is)
with the step it would write, and step k is wrong where its equation (operands, operation,
result, stated answer) differs from the critic's. A check or restart step is re-derived from its
lead-in (`Check:`, `Start again:`), so the critic redoes the same kind of step rather than the next
operation. The first such step is the judge's first error (or the last step, when the solution
stops without stating an answer), -1 when every step matches.

`continue_steps` is the critic: (problem, steps so far, lead-in) -> the step it writes next. The
model-backed one greedily decodes one paragraph with search's one-step `Stepper`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prm_jax.data.steps import STEP_SEPARATOR, join_steps, policy_prompt_ids
from prm_jax.toyworld.world import CHECK_SAID, RESTART_SAID, parse_step

# (problem, steps before the one under review, lead-in) for each request -> the critic's steps
Continue = Callable[[Sequence[tuple[str, Sequence[str], str]]], list[str]]


def lead_in(step: str) -> str:
    """The part of a check or restart step that says what kind of step it is ('' for other steps)."""
    parsed = parse_step(step)
    if parsed and parsed.get("check"):
        return f"{CHECK_SAID}:"
    if parsed and parsed.get("restart"):
        return f"{RESTART_SAID}:"
    return ""


def same_step(step: str, critic_step: str) -> bool:
    """Do the two steps compute the same thing? (restated sentences aside; unreadable steps never match)"""
    a, b = parse_step(step), parse_step(critic_step)
    return a is not None and a == b


def rederive_judge(solutions: Sequence[Mapping[str, Any]], continue_steps: Continue, model_name: str,
                   progress: Callable[[int], None] = lambda n: None) -> list[dict[str, Any]]:
    """Judge records ({**solution, "judge": {"first_error", "model", "raw"}}, the judge stage's format):
    round k re-derives step k of every solution whose steps before k all matched."""
    first_error = [None if not s["steps"] else -1 for s in solutions]
    lines: list[list[str]] = [[] for _ in solutions]
    todo = [i for i, s in enumerate(solutions) if s["steps"]]
    k = 0
    while todo:
        requests = [(solutions[i]["problem"], solutions[i]["steps"][:k], lead_in(solutions[i]["steps"][k]))
                    for i in todo]
        still = []
        for i, mine in zip(todo, continue_steps(requests)):
            steps = solutions[i]["steps"]
            ok = same_step(steps[k], mine)
            last = k + 1 == len(steps)
            unanswered = ok and last and parse_step(steps[k]).get("answer") is None
            verdict = "stops without an answer, incorrect" if unanswered else "correct" if ok else "incorrect"
            lines[i].append(f"Paragraph {k}: {mine}; {verdict}.")
            if not ok or unanswered:
                first_error[i] = k
            if ok and not last:
                still.append(i)
            else:
                progress(1)
        todo, k = still, k + 1
    return [{**s, "judge": {"first_error": fe, "model": model_name, "raw": "\n".join(raw)}}
            for s, fe, raw in zip(solutions, first_error, lines)]


def model_continuer(model, tokenizer, system_prompt: str | None, max_new_tokens: int = 48) -> Continue:
    """The critic model as a `Continue`: greedy decoding of one paragraph (search's `Stepper`, which
    stops a row at the step delimiter) after the policy's chat prompt, the steps so far and the lead-in."""
    import functools

    from prm_jax.search.policy import Request, StepConfig, Stepper

    stepper = Stepper(model, tokenizer, StepConfig(max_tokens=max_new_tokens,
                                                   context=model.cfg.max_position_embeddings))
    prompt_ids = functools.lru_cache(maxsize=None)(lambda problem: policy_prompt_ids(tokenizer, problem, system_prompt))

    def continue_steps(requests):
        rows = []
        for problem, steps, lead in requests:
            text = (join_steps(steps) + STEP_SEPARATOR if steps else "") + lead
            rows.append(Request(tuple(prompt_ids(problem) + tokenizer.encode(text, add_special_tokens=False)), 0, 1))
        segments, _ = stepper.run(rows, greedy=True)
        return [lead + stepper.text(seg.tokens).split(STEP_SEPARATOR)[0]
                for (_, _, lead), (seg,) in zip(requests, segments)]

    return continue_steps
