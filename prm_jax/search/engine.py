"""Runs the strategies of many problems in lockstep: one sampler call and one PRM call per
iteration for all of them, so the policy decodes and the PRM scores in large batches.

KV reuse: each expansion keeps its rows' caches (sampler.KVRows) and the next one passes them
back, so a kept candidate is extended from its cache: its prompt and steps are prefilled once, in
the call that generated them, never again (only its last generated token is fed once more).
The lookahead rounds chain the same way, from the children's caches. At most two such caches are
alive: the expansion's, and the lookahead round's.

The PRM is anything with `score([(problem, steps)]) -> [[step score]]` (prm_jax.evaluation.scoring.
PRMScorer, the scorer `eval` uses, batched and bucketed; tests pass a scripted one); when it also
has `encode(problem, steps)` (PRMScorer does), the tokens it reads are counted.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from prm_jax.data.steps import split_steps
from prm_jax.search.answers import aggregate
from prm_jax.search.policy import Request, Stepper, node_key
from prm_jax.search.strategies import Node, SearchConfig, Strategy, make_strategy


@dataclasses.dataclass
class Problem:
    id: Any
    problem: str
    prompt: tuple[int, ...]  # the policy's chat prefix ids
    strategy: Strategy
    policy_tokens: int = 0
    prm_tokens: int = 0
    prefill_tokens: int = 0  # prompt + candidate ids the policy prefilled (Stepper.prefill_cost)


def prm_tokens(scorer, problem: str, steps: Sequence[str]) -> int:
    """Tokens the PRM reads for one item: up to its last scored step token."""
    encode = getattr(scorer, "encode", None)
    if encode is None or not steps:
        return 0
    enc = encode(problem, steps)
    return enc.step_positions[-1] + 1 if enc.step_positions else 0


def run_problems(problems: Sequence[tuple[Any, str, Sequence[int]]], stepper: Stepper, scorer, cfg: SearchConfig,
                 on_done: Callable[[Problem], None] | None = None) -> list[Problem]:
    """Search every (id, problem text, prompt ids); `on_done(problem)` as each one finishes."""
    states = [Problem(pid, text, tuple(prompt), make_strategy(cfg)) for pid, text, prompt in problems]
    live = list(states)
    kept = None  # the last expansion's KV caches
    while live:
        # 1. expand: every live problem's requests in one sampler call (grouped by to_end); only
        # rows that may go on (not to_end) keep their caches
        asks = [(p, node, copies) for p in live for node, copies in p.strategy.requests()]
        ends = {id(p): p.strategy.to_end for p in live}
        children: dict[int, list[list[Node]]] = {id(p): [] for p in live}
        expanded = None
        for to_end in (True, False):
            group = [a for a in asks if ends[id(a[0])] == to_end]
            reqs = [Request(p.prompt + node.tokens, node_key(p.id, node.path), copies) for p, node, copies in group]
            for (p, _, _), cost in zip(group, stepper.prefill_cost(reqs, kept)):
                p.prefill_tokens += cost
            segs, got = stepper.run(reqs, to_end=to_end, reuse=kept, keep=not to_end)
            if got is not None:
                expanded = got
            for (p, node, _), rows in zip(group, segs):
                kids = []
                for j, seg in enumerate(rows):
                    p.policy_tokens += len(seg.tokens)
                    kids.append(Node(node.tokens + seg.tokens, node.path + (j,), seg.finish))
                children[id(p)].append(kids)
        kept = expanded
        # 2. lookahead: greedy steps past each unfinished child, for its score only
        scored_ids = {(id(p), kid.path): list(kid.tokens) for p in live for kids in children[id(p)] for kid in kids}
        open_kids = [(p, kid) for p in live for kids in children[id(p)] for kid in kids if not kid.finished]
        ahead = kept
        for r in range(cfg.lookahead):
            if not open_kids:
                break
            reqs = [Request(p.prompt + tuple(scored_ids[id(p), kid.path]), 0, 1) for p, kid in open_kids]
            for (p, _), cost in zip(open_kids, stepper.prefill_cost(reqs, ahead)):
                p.prefill_tokens += cost
            segs, ahead = stepper.run(reqs, greedy=True, reuse=ahead, keep=r + 1 < cfg.lookahead)
            still = []
            for (p, kid), (seg,) in zip(open_kids, segs):
                p.policy_tokens += len(seg.tokens)
                scored_ids[id(p), kid.path] += seg.tokens
                if seg.finish is None:
                    still.append((p, kid))
            open_kids = still
        # 3. score every child's steps (with its lookahead) in one PRM call
        flat = [(p, kid) for p in live for kids in children[id(p)] for kid in kids]
        items = [(p.problem, split_steps(stepper.text(scored_ids[id(p), kid.path]))) for p, kid in flat]
        scores = scorer.score(items) if items else []
        new = {}
        for (p, kid), (problem, steps), s in zip(flat, items, scores):
            p.prm_tokens += prm_tokens(scorer, problem, steps)
            new[id(p), kid.path] = dataclasses.replace(kid, step_scores=tuple(s), score=aggregate(s, cfg.agg))
        # 4. let each strategy choose
        still_live = []
        for p in live:
            p.strategy.update([[new[id(p), kid.path] for kid in kids] for kids in children[id(p)]])
            if p.strategy.done:
                if on_done:
                    on_done(p)
            else:
                still_live.append(p)
        live = still_live
    return states
