"""What a finished demo's policy knows about its own errors, read with transformers (torch),
independently of prm_jax's model code:

1. slips or blind spots: for each labelled solution's true first wrong step, the policy's
   log-likelihood of the step it wrote against that of the world's reference step after the same
   (correct) prefix. When it prefers the reference, the error is a slip of sampling and the policy
   holds what a verifier needs; when it prefers what it wrote, a PRM started from it shares the
   blind spot.
2. the policy as a verifier, with no training: on the demo's held-out set, flag the first step whose
   equation differs from the one the policy writes greedily after the same prefix; its
   ProcessBench F1 beside the outcome-only baseline's. (Needs no truth, but one greedy decode per step.)

    python experiments/policy_verifier.py --demo runs/demo [--limit N]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", required=True, help="a finished `prm-jax demo --out` directory")
    ap.add_argument("--limit", type=int, default=0, help="look at the first N erroneous solutions (0 = all)")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = [os.path.join(args.demo, *p) for p in (("policy", "hf"), ("solutions.jsonl",), ("heldout", "toy.json"))]
    for path in paths:
        if not os.path.exists(path):
            sys.exit(f"{path} not found: run `prm-jax demo --out {args.demo}` to the end first")
    tok = AutoTokenizer.from_pretrained(paths[0])
    model = AutoModelForCausalLM.from_pretrained(paths[0], dtype=torch.float32).eval()
    slips(model, tok, paths[1], args.limit)
    with open(paths[2], encoding="utf-8") as f:
        greedy_verifier(model, tok, json.load(f))


def context_ids(tok, sol: dict, k: int) -> list[int]:
    """The policy's prompt and the solution's steps before step k, as the policy continues them."""
    from prm_jax.data.steps import STEP_SEPARATOR, join_steps, policy_prompt_ids

    prefix = join_steps(sol["steps"][:k]) + STEP_SEPARATOR if k else ""
    return policy_prompt_ids(tok, sol["problem"]) + tok(prefix, add_special_tokens=False)["input_ids"]


def slips(model, tok, solutions_path: str, limit: int) -> None:
    import torch

    from prm_jax.records import read_jsonl
    from prm_jax.toyworld.world import check_steps, write_solution

    def step_logp(context: list[int], step: str) -> float:
        ids = torch.tensor([context + tok(step, add_special_tokens=False)["input_ids"]])
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
        reference = write_solution(sol)
        if k >= len(reference):
            continue
        context = context_ids(tok, sol, k)
        margins[verdict.reason].append(step_logp(context, reference[k]) - step_logp(context, sol["steps"][k]))
        if limit and sum(map(len, margins.values())) >= limit:
            break

    print(f"Labelled solutions' first errors\n{'first error':20s} {'n':>5s} {'slips':>6s}  "
          "median log p(reference) - log p(written)")
    for reason, ms in sorted(margins.items(), key=lambda kv: -len(kv[1])) + [("all", sum(margins.values(), []))]:
        ms = sorted(ms)
        slipped, median = sum(m > 0 for m in ms), ms[len(ms) // 2] if ms else 0.0
        print(f"{reason:20s} {len(ms):5d} {100 * slipped / max(len(ms), 1):5.1f}%  {median:+.2f}")


def greedy_verifier(model, tok, heldout: list[dict]) -> None:
    import torch
    from tqdm import tqdm

    from prm_jax.labeling.mc import default_stop_ids
    from prm_jax.data.steps import STEP_SEPARATOR
    from prm_jax.toyworld.truth import baseline_f1, processbench_f1
    from prm_jax.toyworld.world import parse_step

    stops = default_stop_ids(tok)

    def equation(step: str):  # what the world's checker judges (past a restated sentence); else the text
        return parse_step(step) or step.strip()

    def greedy_step(context: list[int]) -> str:
        with torch.no_grad():
            out = model.generate(torch.tensor([context]), max_new_tokens=64, do_sample=False, eos_token_id=stops,
                                 pad_token_id=stops[0])
        return tok.decode(out[0, len(context):], skip_special_tokens=True).split(STEP_SEPARATOR)[0]

    preds = []
    for sol in tqdm(heldout, desc="greedy re-derivation", unit="solution"):
        wrong = (k for k, step in enumerate(sol["steps"])
                 if equation(greedy_step(context_ids(tok, sol, k))) != equation(step))
        preds.append(next(wrong, -1))
    ours = processbench_f1([r["label"] for r in heldout], preds)
    base = baseline_f1(heldout)
    print(f"\nHeld-out first-error F1 ({len(heldout)} solutions)            F1%  error acc%  correct acc%")
    for name, m in (("policy's greedy re-derivation as verifier", ours), ("outcome-only baseline", base)):
        print(f"  {name:48s} {100 * m['f1']:5.1f}  {100 * m['acc_error']:10.1f}  {100 * m['acc_correct']:12.1f}")


if __name__ == "__main__":
    main()
