"""Are a finished demo's policy errors slips or blind spots? For each labelled solution's true first
wrong step, compare the policy's own log-likelihood of the step it wrote with that of the world's
reference step after the same (correct) prefix. When the policy prefers the reference step, the error
is a slip of sampling, and the policy holds what a verifier needs; when it prefers what it wrote, the
error is a blind spot that a PRM initialised from it shares.

    python experiments/policy_slips.py --demo runs/demo [--limit N]

The policy is read with transformers (torch), independently of prm_jax's model code.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", required=True, help="a `prm-jax demo --out` directory past its sample stage")
    ap.add_argument("--limit", type=int, default=0, help="look at the first N erroneous solutions (0 = all)")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prm_jax.labeling.steps import STEP_SEPARATOR, join_steps, policy_prompt_ids
    from prm_jax.records import read_jsonl
    from prm_jax.toyworld.world import check_steps, sample_solutions

    policy_dir = os.path.join(args.demo, "policy", "hf")
    solutions_path = os.path.join(args.demo, "solutions.jsonl")
    for path in (policy_dir, solutions_path):
        if not os.path.exists(path):
            sys.exit(f"{path} not found: run `prm-jax demo --out {args.demo}` past its sample stage first")
    tok = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()

    def step_logp(context: list[int], step: str) -> float:
        step_ids = tok(step, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context + step_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        rows = torch.arange(len(context) - 1, ids.shape[1] - 1)
        return float(logp[rows, ids[0, len(context):]].sum())

    margins = collections.defaultdict(list)  # error reason -> log p(reference) - log p(written)
    for sol in read_jsonl(solutions_path):
        verdict = check_steps(sol, sol["steps"])
        k = verdict.first_error
        if k is None or k < 0:
            continue
        reference = sample_solutions([sol], error_rate=0.0)[0]["steps"]
        if k >= len(reference):
            continue
        prefix = join_steps(sol["steps"][:k]) + STEP_SEPARATOR if k else ""
        context = policy_prompt_ids(tok, sol["problem"]) + tok(prefix, add_special_tokens=False)["input_ids"]
        margins[verdict.reason].append(step_logp(context, reference[k]) - step_logp(context, sol["steps"][k]))
        if args.limit and sum(map(len, margins.values())) >= args.limit:
            break

    print(f"{'first error':20s} {'n':>5s} {'slips':>6s}  median log p(reference) - log p(written)")
    for reason, ms in sorted(margins.items(), key=lambda kv: -len(kv[1])) + [("all", sum(margins.values(), []))]:
        ms = sorted(ms)
        slips = sum(m > 0 for m in ms)
        print(f"{reason:20s} {len(ms):5d} {100 * slips / max(len(ms), 1):5.1f}%  {ms[len(ms) // 2] if ms else 0:+.2f}")


if __name__ == "__main__":
    main()
