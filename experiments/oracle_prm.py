"""How far better labels could take a finished demo's PRM: train the same PRM (same init, steps,
learning rate, batch) on the TRUE first errors of every solution the demo labelled, score it on
the same held-out set, and print it beside the demo's consensus, MC and judge PRMs and the
outcome-only baseline. An oracle PRM that cannot beat the baseline says the limit is the PRM's
capacity or data volume, not label noise.

    python experiments/oracle_prm.py --demo runs/demo [--steps N]

Writes DEMO/train_oracle.jsonl, DEMO/prm_oracle*/ and DEMO/eval_oracle*/ (the demo's own files are
left alone) and prints one table.
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
    ap.add_argument("--steps", type=int, help="PRM training steps (default: the demo's)")
    args = ap.parse_args()

    from prm_jax.demo import Demo, Judge, SIZES
    from prm_jax.labeling.consensus import training_record
    from prm_jax.records import read_jsonl, write_jsonl
    from prm_jax.toyworld.truth import true_first_errors

    report_path = os.path.join(args.demo, "report.json")
    if not os.path.exists(report_path):
        sys.exit(f"{report_path} not found: run `prm-jax demo --out {args.demo}` to the end first")
    with open(os.path.join(args.demo, "demo_settings.json"), encoding="utf-8") as f:
        settings = json.load(f)
    demo = Demo(args.demo, SIZES[settings["size"]], Judge(**settings["judge"]), settings["seed"], quiet=True)
    size = demo.size
    steps = args.steps or size.prm_steps
    tag = f"oracle_s{steps}"

    solutions = read_jsonl(demo.path("solutions.jsonl"))
    truth = true_first_errors(solutions)
    train_file = demo.path("train_oracle.jsonl")
    write_jsonl(train_file, [training_record(r, truth[r["id"]]) for r in solutions])
    for d in (demo.path(f"prm_{tag}"), demo.path(f"eval_{tag}")):
        shutil.rmtree(d, ignore_errors=True)  # `prm-jax train` would resume an earlier run there
    demo.train("prm", train_file, demo.path(f"prm_{tag}"), steps, size.prm_lr, init=demo.path("policy", "hf"),
               batch=16)  # exactly as the demo trains its PRMs (Demo.stage_prm)
    demo.cli("eval", "processbench", "--prm", demo.path(f"prm_{tag}", "hf"), "--data", demo.path("heldout"),
             "--subsets", "toy", "--out", demo.path(f"eval_{tag}"), "--batch-size", 32, "--max-length", 256)

    with open(report_path, encoding="utf-8") as f:
        prm = json.load(f)["prm"]
    with open(demo.path(f"eval_{tag}", "summary.json"), encoding="utf-8") as f:
        oracle = json.load(f)["subsets"]["toy"]
    n_wrong = sum(truth[r["id"]] not in (None, -1) for r in solutions)
    print(f"\nHeld-out first-error F1 ({prm['n_heldout']} solutions); PRMs trained {size.prm_steps} steps "
          f"(oracle {steps})")
    rows = [("PRM on TRUE labels of all %d solutions (%d with an error)" % (len(solutions), n_wrong), oracle["f1"]),
            ("PRM on consensus labels", prm["f1"]), ("PRM on MC labels", prm["mc_f1"]),
            ("PRM on judge labels", prm["judge_f1"]), ("outcome-only baseline", prm["baseline_f1"])]
    for name, f1 in rows:
        print(f"  {name:62s} {100 * f1:5.1f}")
    print(f"  oracle detail: error-set accuracy {100 * oracle['acc_error']:.1f}%, "
          f"correct-set accuracy {100 * oracle['acc_correct']:.1f}%")


if __name__ == "__main__":
    main()
