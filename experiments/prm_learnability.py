"""Can a finished demo's PRM learn to verify a step at all? Trains it (the demo's init, shape and
settings, class-balanced so chance is a loss of ln 2 = 0.693) on the world's reference and
injected-error solutions of the demo's policy problems — plenty of them, every step labelled —
under three labellings of increasing difficulty, and prints each learning curve: training loss and
the loss on a held-out tenth of the solutions:

- `subtraction`: the step subtracts (a surface feature of the step's own text);
- `arithmetic`:  the step's own equation is right (a op b = c), whatever came before (on solutions
                 whose injected errors are all arithmetic ones, so that wrong equations are common);
- `truth`:       the step and every step before it are right (what the PRM is trained towards).

A PRM that learns `subtraction` but stays at chance on `arithmetic` cannot check a computation,
so no labelling method (MC, judge, consensus, or the truth itself) will make it a verifier.

    python experiments/prm_learnability.py --demo runs/demo [--steps 300] [--solutions 3000] [--lr LR]
        [--batch 16] [--torch]

`--torch` also trains the same init on the same records with a plain PyTorch loop over transformers'
Qwen2ForTokenClassification (same schedule, class weights, clipping and batch size), so a plateau
can be told apart from a fault in prm_jax's trainer.
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


LOG_EVERY = 25  # the demo's log_every


def torch_curve(train_file: str, heldout_file: str, init: str, steps: int, lr: float, seed: int,
                batch: int) -> list[dict]:
    """The peer: transformers' Qwen2ForTokenClassification from `init`, trained on `train_file` by a plain
    torch loop with prm_jax's recipe (AdamW, linear warmup then cosine to lr/10, clip 1.0, inverse-
    frequency class weights, loss = weighted NLL summed over step tokens / their count); the held-out
    loss on `heldout_file` at each logged step. Both are encoded by prm_jax's own pipeline, so the
    two trainers see the same examples."""
    import math
    import random

    import torch
    from transformers import AutoTokenizer, Qwen2ForTokenClassification
    from transformers.utils import logging as hf_logging

    from prm_jax.data import pipeline as pl
    from prm_jax.data.prm_format import resolve_step_token
    from prm_jax.training.losses import balanced_class_weights

    hf_logging.set_verbosity_error()  # its load report (the LM head unused, the score head new) is expected
    tok = AutoTokenizer.from_pretrained(init)
    opts = pl.EncodeOptions(objective="prm", step_token_id=resolve_step_token(tok))
    rows = pl.encode_records(tok, train_file, opts).examples
    held_rows = pl.encode_records(tok, heldout_file, opts).examples

    def weighted_loss(chunk: list[dict], weights: torch.Tensor) -> tuple[torch.Tensor, int]:
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id)
        labels = torch.full((len(chunk), width), pl.IGNORE)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, e in enumerate(chunk):
            n = len(e["input_ids"])
            ids[r, :n], labels[r, :n] = torch.from_numpy(e["input_ids"]), torch.from_numpy(e["labels"])
            mask[r, :n] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits
        keep = labels != pl.IGNORE
        nll = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="none")
        return (nll * weights[labels[keep]]).sum() / keep.sum(), int(keep.sum())

    class_weights = torch.tensor(balanced_class_weights(rows))  # (wrong, right), as `class_balance=true`
    torch.manual_seed(seed)
    model = Qwen2ForTokenClassification.from_pretrained(init, num_labels=2)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(20, steps // 5)

    def lr_factor(s: int) -> float:
        if s < warmup:
            return s / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / max(steps - warmup, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    rng, curve, window = random.Random(seed), [], []
    for step in range(1, steps + 1):
        loss, n = weighted_loss(rng.sample(rows, batch), class_weights)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        window.append((loss.item() * n, n))
        if step % LOG_EVERY == 0:
            with torch.no_grad():
                # unweighted, as prm_jax's eval loss
                held = [weighted_loss(held_rows[i:i + 64], torch.ones(2)) for i in range(0, len(held_rows), 64)]
            curve.append({"step": step, "loss": sum(w[0] for w in window) / sum(w[1] for w in window),
                          "held": sum(h.item() * n for h, n in held) / sum(n for _, n in held)})
            window = []
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", required=True, help="a `prm-jax demo --out` directory past its policy stage")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--solutions", type=int, default=3000)
    ap.add_argument("--lr", type=float, help="peak learning rate (default: the demo's PRM one)")
    ap.add_argument("--rules", default="subtraction,arithmetic,truth")
    ap.add_argument("--batch", type=int, help="PRM batch size (default: the demo's)")
    ap.add_argument("--torch", action="store_true", help="also train the same init with a plain torch loop (the peer)")
    args = ap.parse_args()

    from prm_jax.demo import Demo
    from prm_jax.records import read_jsonl, write_jsonl
    from prm_jax.toyworld.world import ERROR_KINDS, sample_solutions

    if not os.path.isdir(os.path.join(args.demo, "policy", "hf")):
        sys.exit(f"{args.demo}/policy/hf not found: run `prm-jax demo --out {args.demo}` past its policy stage")
    demo = Demo.load(args.demo)
    problems = read_jsonl(demo.path("data", "policy_problems.jsonl"))[: args.solutions]
    lr, batch = args.lr or demo.size.prm_lr, args.batch or demo.size.prm_batch
    curves = {}
    for rule in args.rules.split(","):
        kinds = ("arithmetic",) if rule == "arithmetic" else ERROR_KINDS
        solutions = sample_solutions(problems, seed=demo.seed + 7, error_rate=0.5, kinds=kinds)
        records = [{"id": s["id"], "problem": s["problem"], "steps": s["steps"], "labels": step_labels(s, rule)}
                   for s in solutions]
        out = demo.path(f"learnability_{rule}")
        shutil.rmtree(out, ignore_errors=True)  # `prm-jax train` would resume an earlier run there
        held = len(records) // 10
        write_jsonl(out + ".jsonl", records[held:])
        write_jsonl(out + "_heldout.jsonl", records[:held])
        demo.train("prm", out + ".jsonl", out, args.steps, lr, init=demo.path("policy", "hf"), batch=batch,
                   overrides=("class_balance=true", f"eval_every={LOG_EVERY}"), eval_file=out + "_heldout.jsonl")
        rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
        evals = {r["step"]: r for r in rows if r.get("split") == "eval"}
        curves[rule] = [{**r, "held": evals.get(r["step"], {}).get("eval_loss")} for r in rows if "loss" in r]
        if args.torch:
            curves[f"{rule} (torch)"] = torch_curve(out + ".jsonl", out + "_heldout.jsonl",
                                                     demo.path("policy", "hf"), args.steps, lr, demo.seed, batch)
        n = sum(len(r["labels"]) for r in records)
        wrong = sum(r["labels"].count(0) for r in records)
        print(f"[{rule}] {len(records)} solutions, {n} step labels, {wrong / n:.0%} of them 0")

    print(f"\nPRM learnability ({len(problems)} reference / injected-error solutions, a tenth held out; "
          f"class-balanced loss, chance = 0.693; batch {batch}, lr {lr:g})")
    print("rule                  " + "".join(f"{'step ' + str(r['step']):>14s}" for r in next(iter(curves.values()))))
    for rule, rows in curves.items():
        print(f"{rule:21s} " + "".join(f"  {r['loss']:5.3f} / {r['held']:5.3f}" for r in rows))
    print("(training loss / held-out loss at each logged step)")


if __name__ == "__main__":
    main()
