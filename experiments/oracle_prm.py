"""How far better labels could take a finished demo's PRM: train it through the demo's own PRM and
evaluation stages on the TRUE first errors of every solution the demo labelled, and print it beside
the demo's consensus, MC and judge PRMs and the outcome-only baseline. An oracle PRM that cannot
beat the baseline says the limit is the PRM's capacity or data volume, not label noise.

    python experiments/oracle_prm.py --demo runs/demo [--problems N] [--steps S] [--batch B] [--set K=V ...]

--problems N trains the oracle instead on the policy's samples for N fresh problems (disjoint from every
set the demo drew; the demo's samples per problem each), --steps S for S steps instead of the demo's:
does more data or more training, with perfect labels, make the PRM a verifier? --set changes any other
field of the demo's size for the oracle, as `prm-jax demo --set` does (e.g. prm_class_balance=true).

Writes DEMO/train_oracle.jsonl, DEMO/prm_oracle/, DEMO/eval_oracle/ and DEMO/bon_oracle/ (the
demo's own files are left alone) and prints one table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", required=True, help="a finished `prm-jax demo --out` directory")
    ap.add_argument("--problems", type=int, default=0, help="sample this many fresh problems (default: none, "
                    "train on the demo's own labelled solutions)")
    ap.add_argument("--steps", type=int, help="PRM training steps (default: the demo's)")
    ap.add_argument("--batch", type=int, help="PRM batch size (default: the demo's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="change a field of the demo's size for the oracle (repeatable), as `prm-jax demo --set`")
    args = ap.parse_args()

    from prm_jax.demo import Demo, resize
    from prm_jax.labeling.consensus import training_record
    from prm_jax.records import read_jsonl, write_jsonl
    from prm_jax.toyworld.truth import true_first_errors

    report_path = os.path.join(args.demo, "report.json")
    if not os.path.exists(report_path):
        sys.exit(f"{report_path} not found: run `prm-jax demo --out {args.demo}` to the end first")
    demo = Demo.load(args.demo)
    shorthands = [f"{key}={v}" for key, v in (("prm_steps", args.steps), ("prm_batch", args.batch)) if v]
    try:
        demo.size = resize(demo.size, shorthands + args.set)
    except ValueError as e:
        sys.exit(f"error: {e}")
    solutions = read_jsonl(demo.path("solutions.jsonl"))
    if args.problems:
        solutions = sample_fresh(demo, args.problems)
    truth = true_first_errors(solutions)
    write_jsonl(demo.path("train_oracle.jsonl"),
                [training_record(r, truth[r["id"]]) for r in solutions if truth[r["id"]] is not None])
    for d in ("prm_oracle", "eval_oracle", "bon_oracle"):
        shutil.rmtree(demo.path(d), ignore_errors=True)  # `prm-jax train` would resume an earlier run there
    demo.stage_prm("oracle")
    demo.stage_eval("oracle")

    with open(report_path, encoding="utf-8") as f:
        prm = json.load(f)["prm"]
    with open(demo.path("eval_oracle", "summary.json"), encoding="utf-8") as f:
        oracle = json.load(f)["subsets"]["toy"]
    n_wrong = sum(truth[r["id"]] not in (None, -1) for r in solutions)
    print(f"\nHeld-out first-error F1 ({prm['n_heldout']} solutions); the oracle trained {demo.size.prm_steps} steps "
          f"of batch {demo.size.prm_batch}" + (f", --set {' '.join(args.set)}" if args.set else ""))
    rows = [("PRM on TRUE labels of %d policy solutions (%d with an error)" % (len(solutions), n_wrong), oracle["f1"]),
            ("PRM on consensus labels", prm["f1"]), ("PRM on MC labels", prm["mc_f1"]),
            ("PRM on judge labels", prm["judge_f1"]), ("outcome-only baseline", prm["baseline_f1"])]
    for name, f1 in rows:
        print(f"  {name:62s} {100 * f1:5.1f}")
    print(f"  oracle detail: error-set accuracy {100 * oracle['acc_error']:.1f}%, "
          f"correct-set accuracy {100 * oracle['acc_correct']:.1f}%")


def sample_fresh(demo, n: int) -> list[dict]:
    """The demo's policy's samples for `n` new problems of the demo's world (none seen by any of its sets),
    drawn as the demo drew the solutions it labelled."""
    from prm_jax.records import read_jsonl, write_jsonl
    from prm_jax.toyworld import world

    cfg = world.WorldConfig.for_size(demo.size.world, **demo.size.world_overrides)
    seen = {p["problem"] for name in ("policy", "critic", "label", "heldout")
            for p in read_jsonl(demo.path("data", f"{name}_problems.jsonl"))}
    fresh = [p for p in world.generate_problems(4 * n, seed=demo.seed * 100 + 99, cfg=cfg, id_prefix="oracle")
             if p["problem"] not in seen][:n]
    write_jsonl(demo.path("data", "oracle_problems.jsonl"), fresh)
    out = demo.path("oracle_solutions.jsonl")
    if os.path.exists(out):
        os.remove(out)  # `prm-jax sample` would continue an earlier file
    demo.sample(demo.path("data", "oracle_problems.jsonl"), out, demo.size.samples_per_problem, demo.seed + 5,
                batch_size=256, temperature=demo.size.label_temperature)
    return read_jsonl(out)


if __name__ == "__main__":
    main()
