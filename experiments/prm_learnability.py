"""Can a finished demo's PRM learn to verify a step at all? Trains it (the demo's init, shape and
settings, class-balanced so chance is a loss of ln 2 = 0.693) on the world's reference and
injected-error solutions of the demo's policy problems — plenty of them, every step labelled —
under three labellings of increasing difficulty, and prints each learning curve:

- `subtraction`: the step subtracts (a surface feature of the step's own text);
- `arithmetic`:  the step's own equation is right (a op b = c), whatever came before (on solutions
                 whose injected errors are all arithmetic ones, so that wrong equations are common);
- `truth`:       the step and every step before it are right (what the PRM is trained towards).

A PRM that learns `subtraction` but stays at chance on `arithmetic` cannot check a computation,
so no labelling method (MC, judge, consensus, or the truth itself) will make it a verifier.

    python experiments/prm_learnability.py --demo runs/demo [--steps 300] [--solutions 3000] [--lr LR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys


def step_labels(solution: dict, rule: str) -> list[int]:
    from prm_jax.toyworld.world import apply_op, check_steps, parse_step

    if rule == "truth":
        return [int(ok) for ok in check_steps(solution, solution["steps"]).step_correct]
    labels = []
    for text in solution["steps"]:
        parsed = parse_step(text) or {}
        if rule == "subtraction":
            labels.append(int(parsed.get("op") == "-"))
        elif "c" in parsed:
            labels.append(int(apply_op(parsed["a"], parsed["op"], parsed["b"]) == parsed["c"]))
        else:  # a bare answer statement: no equation to check
            labels.append(1)
    return labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", required=True, help="a `prm-jax demo --out` directory past its policy stage")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--solutions", type=int, default=3000)
    ap.add_argument("--lr", type=float, help="peak learning rate (default: the demo's PRM one)")
    ap.add_argument("--rules", default="subtraction,arithmetic,truth")
    args = ap.parse_args()

    from prm_jax.demo import Demo
    from prm_jax.records import read_jsonl, write_jsonl
    from prm_jax.toyworld.world import ERROR_KINDS, sample_solutions

    if not os.path.isdir(os.path.join(args.demo, "policy", "hf")):
        sys.exit(f"{args.demo}/policy/hf not found: run `prm-jax demo --out {args.demo}` past its policy stage")
    demo = Demo.load(args.demo)
    problems = read_jsonl(demo.path("data", "policy_problems.jsonl"))[: args.solutions]
    curves = {}
    for rule in args.rules.split(","):
        kinds = ("arithmetic",) if rule == "arithmetic" else ERROR_KINDS
        solutions = sample_solutions(problems, seed=demo.seed + 7, error_rate=0.5, kinds=kinds)
        records = [{"id": s["id"], "problem": s["problem"], "steps": s["steps"], "labels": step_labels(s, rule)}
                   for s in solutions]
        out = demo.path(f"learnability_{rule}")
        shutil.rmtree(out, ignore_errors=True)  # `prm-jax train` would resume an earlier run there
        write_jsonl(out + ".jsonl", records)
        demo.train("prm", out + ".jsonl", out, args.steps, args.lr or demo.size.prm_lr, init=demo.path("policy", "hf"),
                   overrides=("class_balance=true",))
        curves[rule] = read_jsonl(os.path.join(out, "metrics.jsonl"))
        n = sum(len(r["labels"]) for r in records)
        wrong = sum(r["labels"].count(0) for r in records)
        print(f"[{rule}] {len(records)} solutions, {n} step labels, {wrong / n:.0%} of them 0")

    print(f"\nPRM learnability ({len(problems)} reference / injected-error solutions, class-balanced loss; "
          f"chance = 0.693)")
    print("rule          " + "".join(f"{'step ' + str(r['step']):>12s}" for r in next(iter(curves.values()))))
    for rule, rows in curves.items():
        print(f"{rule:13s} " + "".join(f"{r['loss']:7.3f} ({r['step_accuracy']:.2f})" for r in rows))
    print("(loss (step accuracy) at each logged step)")


if __name__ == "__main__":
    main()
