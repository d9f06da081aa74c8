"""Is the demo's headline a property of the recipe or of one seed? Runs `prm-jax demo` once per seed
(each in its own process, as a user runs it; a seed whose run is in OUT already is continued with
--resume, so an interrupted sweep picks up where it stopped) and prints one row per seed: the
policy's share of fully correct solutions, each label source's first-error accuracy against the
truth, and each PRM's held-out first-error F1 with its two accuracies beside the outcome-only
baseline's and the content-blind reference's F1 (a predictor that never reads a solution). The last lines
count the seeds where the consensus labels are more accurate than MC labels by over 10 points (what the
tiny demo's test asserts) or than the judge's, and where the consensus PRM beats the baseline and the
content-blind reference. Then the paper's lessons, issue 28's claims (a)-(d), each with its numbers per
seed and the count of seeds where it holds (from each run's report.json "claims").

    python experiments/demo_seeds.py --out runs/demo_seeds --seeds 0-4 [--size small] [--set KEY=VALUE ...]

(error acc / correct acc: share of erroneous solutions whose first error is found exactly / share of
correct solutions left unflagged — ProcessBench's two accuracies, whose harmonic mean is F1.)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def seed_list(spec: str) -> list[int]:
    """"0-4" or "0,2,5" -> seeds."""
    seeds = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi or lo) + 1))
    return seeds


def run_seed(out: str, size: str, seed: int, assignments: list[str]) -> dict:
    run = os.path.join(out, f"seed{seed}")
    argv = [sys.executable, "-m", "prm_jax.cli", "demo", "--out", run, "--size", size, "--seed", str(seed), "--quiet"]
    argv += [f"--set={a}" for a in assignments]
    if os.path.isdir(os.path.join(run, "stages")):
        argv.append("--resume")
    t0 = time.perf_counter()
    with open(os.path.join(out, f"seed{seed}.log"), "w") as log:
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"seed {seed}: prm-jax demo exited with {proc.returncode}; see {log.name}")
    with open(os.path.join(run, "report.json"), encoding="utf-8") as f:
        return {**json.load(f), "seconds": time.perf_counter() - t0}


def pct(x) -> str:
    return "  -" if x is None else f"{100 * x:3.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo_seeds")
    ap.add_argument("--seeds", default="0-4")
    ap.add_argument("--size", default="small", choices=("tiny", "small"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to every `prm-jax demo`")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    prms = (("consensus", ""), ("mc", "mc_"), ("judge", "judge_"))
    print("labels: each source's first-error accuracy against the truth, %; PRMs and the outcome-only baseline: "
          "held-out F1 (error acc / correct acc), %")
    print(f"{'seed':>4} {'time s':>6} {'policy ok%':>10} | {'mc':>4} {'judge':>5} {'cons':>5} | "
          + " | ".join(f"{name + ' PRM':>15}" for name, _ in prms) + f" | {'baseline':>15} | blind", flush=True)
    beats, beats_blind, over_mc, over_judge, reports = [], [], [], [], []
    for seed in seed_list(args.seeds):
        r = run_seed(args.out, args.size, seed, args.set)
        lq, prm = r["label_quality"], r["prm"]
        scores = [(prm[k + "f1"], prm[k + "detail"]) for _, k in prms] + [(prm["baseline_f1"], prm["baseline"])]
        cells = [f"{pct(f1)} ({pct(d['acc_error'])}/{pct(d['acc_correct'])})" for f1, d in scores]
        print(f"{seed:>4} {r['seconds']:6.0f} {pct(r['policy']['process_correct']):>10} | "
              f"{pct(lq['mc']['first_error_accuracy'])} {pct(lq['judge']['first_error_accuracy']):>5} "
              f"{pct(lq['consensus']['first_error_accuracy']):>5} | " + " | ".join(f"{c:>15}" for c in cells)
              + f" | {pct(prm.get('blind_f1')):>5}", flush=True)
        beats.append(prm["f1"] > prm["baseline_f1"])
        beats_blind.append(prm["f1"] > prm.get("blind_f1", 1.0))
        acc = {src: lq[src]["first_error_accuracy"] for src in ("mc", "judge", "consensus")}
        over_mc.append(acc["consensus"] > acc["mc"] + 0.1)
        over_judge.append(acc["consensus"] > acc["judge"])
        reports.append((seed, r))
    print(f"consensus labels beat MC labels by over 10 points on {sum(over_mc)} of {len(over_mc)} seeds, "
          f"the judge's on {sum(over_judge)}")
    print(f"consensus PRM beats the outcome-only baseline on {sum(beats)} of {len(beats)} seeds, "
          f"the content-blind reference on {sum(beats_blind)}")
    print_claims(reports)


CLAIMS = {  # issue 28's claims and how many of five seeds each needs
    "a": ("consensus labels match the truth more often than MC and than judge labels", "5/5"),
    "b": ("the consensus PRM beats the content-blind reference and the outcome-only baseline", ">= 4/5"),
    "c": ("the consensus PRM beats the MC-only PRM", ">= 4/5"),
    "d": ("PRM-weighted best-of-N and beam search beat majority vote at the same N", ">= 4/5"),
}


def print_claims(reports: list[tuple[int, dict]]) -> None:
    """Per claim: each seed's numbers (report["claims"], written by the demo's report stage) and the count
    of seeds where it holds, beside what the issue asks."""
    for cid, (text, needs) in CLAIMS.items():
        rows = [(seed, next((c for c in r.get("claims", []) if c["id"] == cid), None)) for seed, r in reports]
        held = sum(bool(c and c["holds"]) for _, c in rows)
        print(f"\n({cid}) {text}: holds on {held} of {len(rows)} seeds (the issue asks {needs} of each five)")
        for seed, c in rows:
            if c is None:
                print(f"  seed {seed}: not measured by this run")
                continue
            nums = ", ".join(f"{k} {v}" if k == "n" else f"{k} {100 * v:.1f}" for k, v in c["numbers"].items()
                             if v is not None)
            print(f"  seed {seed}: {'holds' if c['holds'] else 'does not hold'} ({nums})")


if __name__ == "__main__":
    main()
