"""Training data for the toy critic, the demo's stand-in for the paper's judge model, and the
policy's training texts.

A critic example is the judge prompt exactly as the judge stage renders it (the judge module's
`JudgeTemplate.messages`, so the numbering base and reply style are the template's) followed by a
target reply in that template's reply style. The reply checks the paragraphs in order, writing
for each what the step should be (the critic redoes the arithmetic, as a real judge would) and
stopping at the first wrong one:

    boxed style (ProcessBench critic):    Paragraph 0: 7 + 5 = 12, correct.
                                          Paragraph 1: expected 12 - 3 = 9; wrong result, incorrect.
                                          \\boxed{1}
    conclusion style:                     <analysis_1>7 + 5 = 12, correct.</analysis_1> ...
                                          <conclusion>Incorrect</conclusion>

so that `prm_jax.labeling.judge.parse_verdict` reads back the true first error.
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prm_jax.toyworld.world import (
    chat_messages, check_steps, expected_check, format_step, parse_step, render_chat, running_values, sample_solutions,
    world_of,
)

REASON_WORDS = {
    "unparseable": "cannot be read",
    "wrong_carry": "wrong starting value",
    "wrong_operation": "wrong operation",
    "wrong_operand": "wrong number",
    "arithmetic": "wrong result",
    "wrong_check": "wrong check",
    "premature_answer": "answers too early",
    "wrong_answer": "wrong answer",
    "after_answer": "goes on after the answer",
    "extra_step": "extra step",
    "missing_answer": "no answer stated",
    "unfinished": "stops too early",
}


def _expected_steps(world: Mapping[str, Any], steps: Sequence[str], upto: int) -> list[str]:
    """What each of steps[0..upto] should say, given that the steps before it are right: a check
    undoes the step before it, a restart begins again at the first operation."""
    ops, values = world["ops"], running_values(world)
    done, out = 0, []
    for i in range(upto + 1):
        parsed = parse_step(steps[i]) if i < len(steps) else None
        is_op = parsed is not None and "op" in parsed
        if is_op and parsed["check"]:
            out.append(expected_check(values, ops, done) or "no check before a step")
            continue
        if is_op and parsed["restart"]:
            done = 0
        if done < len(ops):
            op, b = ops[done]
            out.append(format_step(values[done], op, b, values[done + 1]))
        else:
            out.append(f"answer {values[-1]}")
        if is_op:
            done += 1
    return out


def critic_reply(world: Mapping[str, Any], steps: Sequence[str], index_base: int = 0,
                 style: str = "boxed") -> str:
    """The target reply for a solution: per-paragraph checks up to the true first error, then
    the verdict in `style` ("boxed": \\boxed{k}, k = first error + index_base or -1;
    "conclusion"/"auto": <analysis_k> tags and <conclusion>Correct|Incorrect</conclusion>)."""
    world = world_of(world)
    verdict = check_steps(world, steps)
    if verdict.first_error is None:
        raise ValueError("an empty solution has no first error to teach")
    fe = verdict.first_error
    upto = len(steps) - 1 if fe < 0 else fe
    lines = []
    for i, expected in enumerate(_expected_steps(world, steps, upto)):
        if i == fe:
            text = f"expected {expected}; {REASON_WORDS.get(verdict.reason, verdict.reason)}, incorrect."
        else:
            text = f"{expected}, correct."
        k = i + index_base
        lines.append(f"Paragraph {k}: {text}" if style == "boxed" else f"<analysis_{k}>{text}</analysis_{k}>")
    if style == "boxed":
        lines.append(f"\\boxed{{{-1 if fe < 0 else fe + index_base}}}")
    else:
        lines.append(f"<conclusion>{'Correct' if fe < 0 else 'Incorrect'}</conclusion>")
    return "\n".join(lines)


def critic_examples(solutions: Iterable[Mapping[str, Any]], template) -> list[dict[str, Any]]:
    """{"id", "messages" (judge prompt + target reply), "first_error"} for each solution record
    (which carries its "world"); `template` is a prm_jax.labeling.judge.JudgeTemplate."""
    out = []
    for sol in solutions:
        reply = critic_reply(sol, sol["steps"], template.index_base, template.verdict)
        messages = template.messages(sol["problem"], sol["steps"]) + [{"role": "assistant", "content": reply}]
        out.append({"id": sol["id"], "messages": messages,
                    "first_error": check_steps(sol, sol["steps"]).first_error})
    return out


def critic_training_set(problems: Sequence[Mapping[str, Any]], template, seed: int = 0,
                        error_rate: float = 0.5, per_problem: int = 1, **failure_shares: float) -> list[dict[str, Any]]:
    """Critic examples on solutions with controlled errors (about `error_rate` of them wrong);
    `failure_shares` (restart_rate, check_rate, slip_rate) as in `world.sample_solutions`."""
    return critic_examples(sample_solutions(problems, seed=seed, error_rate=error_rate,
                                            per_problem=per_problem, **failure_shares), template)


def policy_training_set(problems: Sequence[Mapping[str, Any]], seed: int = 0, error_rate: float = 0.0,
                        system_prompt: str | None = None) -> list[dict[str, Any]]:
    """{"id", "messages"} chat examples for the policy's causal-LM training: reference solutions,
    or with probability `error_rate` one with an injected error (more varied samples to label)."""
    sols = sample_solutions(problems, seed=seed, error_rate=error_rate)
    return [{"id": s["id"], "messages": chat_messages(s["problem"], s["steps"], system_prompt)} for s in sols]


def judge_corpus_texts(template, n: int = 50, seed: int = 0) -> list[str]:
    """Rendered critic examples, to add to the tokenizer corpus (`tokenizer_corpus(extra_texts=...)`)."""
    from prm_jax.toyworld.world import generate_problems

    rng = random.Random(seed)
    problems = generate_problems(n, seed=rng.randrange(1 << 30), id_prefix="judge-corpus")
    return [render_chat(ex["messages"]) for ex in critic_training_set(problems, template, seed=seed)]


TOY_JUDGE_TEMPLATE = "judge_template.txt"


def toy_judge_template_path() -> str:
    """Path of the toy critic's short judge template (a file `prm-jax judge --template` accepts)."""
    import importlib.resources

    return str(importlib.resources.files("prm_jax.toyworld") / TOY_JUDGE_TEMPLATE)


def toy_judge_template():
    """The toy critic's JudgeTemplate (index style, paragraphs from 0)."""
    from prm_jax.labeling.judge import load_template

    return load_template(toy_judge_template_path())
