"""The judge stage against a real `vllm serve`: the same critic, template and solutions judged through
`prm-jax judge --api openai` (vLLM's OpenAI-compatible server) and `prm-jax judge --api local` (our JAX
sampler), both greedy, and the verdicts compared record for record.

    python experiments/vllm_judge_check.py [--vllm-python /work/peers/vllm/bin/python] [--out DIR]
                                           [--solutions 48] [--critic DIR]

vLLM is never a dependency of prm_jax: it runs from its own venv (shared/tools/peer-venvs.sh), as a separate
server on 127.0.0.1 and a free port, and is always stopped (its whole process group) before this script exits.

The critic is the demo's toy critic (prm_jax.demo: `world` and `critic` stages), trained here at hidden 128
with 2 heads and 1 kv head, so head_dim is 64, a size vLLM's CPU attention supports (the demo's own
hidden-64 / 4-head critic has head_dim 16). It is kept in OUT/critic and reused by later runs; `--critic DIR`
takes any Qwen2ForCausalLM directory with a chat template instead. The solutions are the toy world's
reference solutions and injected-error ones (about half wrong) on the demo's labelling problems.

Where two raw replies differ, both are tokenised with the critic's tokenizer and the first differing token is
shown, with our model's logits of the two candidates at that point (prompt + the shared prefix): a gap near 0
means a near-tie that float differences between the two engines may flip.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
from vllm_peer import served

from prm_jax.demo import SIZES, Demo, Judge, resize
from prm_jax.models.hf import load_causal_lm, load_tokenizer
from prm_jax.records import read_jsonl, write_jsonl
from prm_jax.toyworld import critic as toy_critic
from prm_jax.toyworld import world

# head_dim 128 / 2 = 64: vLLM's CPU attention backend has no kernel for the demo's head_dim 16.
CRITIC_SET = ("model.hidden_size=128", "model.num_heads=2", "model.num_kv_heads=1", "model.intermediate_size=384")
MAX_NEW_TOKENS = 160  # as the demo's judge stage
MAX_MODEL_LEN = 1024  # the demo models' max_position_embeddings
SERVED_NAME = "toy-critic"


def build_critic(out: str, seed: int, steps: int) -> str:
    """The demo's critic (world + critic stages) in OUT, at head_dim 64; reused when already there."""
    hf = os.path.join(out, "critic", "hf")
    if os.path.isfile(os.path.join(hf, "config.json")):
        print(f"critic: reusing {hf}", flush=True)
        return hf
    size = resize(SIZES["tiny"], [*CRITIC_SET, f"critic_steps={steps}"])
    demo = Demo(out, size, Judge(kind="critic"), seed, quiet=True)
    t0 = time.time()
    demo.stage_world()
    demo.stage_critic()
    print(f"critic: trained {steps} steps in {time.time() - t0:.0f} s -> {hf}", flush=True)
    return hf


def make_solutions(out: str, n: int, seed: int) -> str:
    problems = read_jsonl(os.path.join(out, "data", "label_problems.jsonl"))[:n]
    path = os.path.join(out, "judge_solutions.jsonl")
    write_jsonl(path, world.sample_solutions(problems, seed=seed + 1, error_rate=0.5))
    return path


def run_judge(args: list[str], out: str, timeout: float) -> float:
    """`prm-jax judge ... --out OUT` in a fresh process (a fresh OUT: the stage appends and caches)."""
    for p in (out, out + ".cache.jsonl", out + ".failed.jsonl"):
        if os.path.exists(p):
            os.remove(p)
    cmd = [sys.executable, "-m", "prm_jax.cli", "judge", *args, "--out", out, "--no-progress"]
    print("$ prm-jax " + " ".join(cmd[3:]), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"prm-jax judge exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    for line in proc.stdout.strip().splitlines()[-4:]:
        print("  " + line, flush=True)
    return time.time() - t0


def divergence(tokenizer, model, messages: list[dict], a: str, b: str) -> str:
    """Where two replies part: the first differing token of their tokenisations, and our model's logits of both
    candidates after prompt + shared prefix (the greedy choice is the larger one)."""
    ta = tokenizer.encode(a, add_special_tokens=False)
    tb = tokenizer.encode(b, add_special_tokens=False)
    k = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                              add_special_tokens=False)
    ids = jnp.asarray([prompt + ta[:k]], jnp.int32)
    logits = np.asarray(model(ids)[0, -1], np.float64)
    top2 = np.argsort(logits)[::-1][:2]

    def name(ts, i):
        return repr(tokenizer.decode([ts[i]])) if i < len(ts) else "<end>"

    gap = logits[top2[0]] - logits[top2[1]]
    return (f"reply token {k}: vllm {name(ta, k)} vs local {name(tb, k)}; prm_jax top-2 there "
            f"{tokenizer.decode([int(top2[0])])!r} {logits[top2[0]]:.4f}, {tokenizer.decode([int(top2[1])])!r} "
            f"{logits[top2[1]]:.4f} (gap {gap:.2e})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-python", default="/work/peers/vllm/bin/python")
    ap.add_argument("--out", default="/tmp/vllm_judge_check")
    ap.add_argument("--critic", help="a Qwen2ForCausalLM directory with a chat template (default: train the toy "
                                     "critic into OUT/critic)")
    ap.add_argument("--critic-steps", type=int, default=SIZES["tiny"].critic_steps)
    ap.add_argument("--solutions", type=int, default=48, help="toy solutions to judge (the demo has 48 labelling problems)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kvcache-gib", default="1", help="VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--ready-timeout", type=float, default=900)
    ap.add_argument("--judge-timeout", type=float, default=900)
    args = ap.parse_args()
    if not os.path.isfile(args.vllm_python):
        sys.exit(f"--vllm-python {args.vllm_python}: not found; build the venv with shared/tools/peer-venvs.sh DIR vllm")
    os.makedirs(args.out, exist_ok=True)
    hf = args.critic or build_critic(args.out, args.seed, args.critic_steps)
    if args.critic and not os.path.isfile(os.path.join(args.out, "data", "label_problems.jsonl")):
        Demo(args.out, SIZES["tiny"], Judge(), args.seed, quiet=True).stage_world()  # problems only
    solutions = make_solutions(args.out, args.solutions, args.seed)
    template = toy_critic.toy_judge_template_path()
    common = ["--solutions", solutions, "--template", template, "--temperature", "0",
              "--max-new-tokens", str(MAX_NEW_TOKENS)]

    # Ours first, while no server holds the CPU.
    local_out = os.path.join(args.out, "judged_local.jsonl")
    t_local = run_judge([*common, "--api", "local", "--model", hf, "--batch-size", "8"], local_out,
                        args.judge_timeout)

    vllm_out = os.path.join(args.out, "judged_vllm.jsonl")
    serve_args = ["--served-model-name", SERVED_NAME, "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
                  "--seed", str(args.seed), "--generation-config", "vllm", "--enforce-eager"]
    with served(args.vllm_python, hf, serve_args, args.out, kvcache_gib=args.kvcache_gib,
                ready_timeout=args.ready_timeout) as url:
        t_vllm = run_judge([*common, "--api", "openai", "--endpoint", url, "--model", SERVED_NAME,
                            "--concurrency", "4", "--timeout", "300", "--max-retries", "2"], vllm_out,
                           args.judge_timeout)

    local = {r["id"]: r for r in read_jsonl(local_out)}
    remote = {r["id"]: r for r in read_jsonl(vllm_out)}
    if set(local) != set(remote):
        raise SystemExit(f"the two runs judged different records: only local {sorted(set(local) - set(remote))}, "
                         f"only vllm {sorted(set(remote) - set(local))}")
    tokenizer = load_tokenizer(hf)
    model = None
    verdicts_differ = raws_differ = 0
    unparsed = sum(r["judge"]["first_error"] is None for r in local.values())
    for rid, lrec in local.items():
        vrec = remote[rid]
        lv, vv = lrec["judge"]["first_error"], vrec["judge"]["first_error"]
        lraw, vraw = lrec["judge"]["raw"], vrec["judge"]["raw"]
        verdicts_differ += lv != vv
        if lraw != vraw:
            raws_differ += 1
            if model is None:
                model = load_causal_lm(hf)
            messages = toy_critic.toy_judge_template().messages(lrec["problem"], lrec["steps"])
            print(f"  {rid}: verdict vllm {vv} vs local {lv}; "
                  f"{divergence(tokenizer, model, messages, vraw, lraw)}", flush=True)
    truth = {s["id"]: world.check_steps(s, s["steps"]).first_error for s in read_jsonl(solutions)}
    right = sum(local[i]["judge"]["first_error"] == truth[i] for i in local)
    source = f"--critic {args.critic}" if args.critic else f"toy critic trained {args.critic_steps} steps"
    print(f"vllm_judge_check: {len(local)} solutions, {verdicts_differ} verdicts differ, {raws_differ} raw replies "
          f"differ (greedy, float32, {source}, head_dim 64; local {t_local:.0f} s, vllm {t_vllm:.0f} s; "
          f"local verdicts = truth on {right}/{len(local)}, {unparsed} unparsed)", flush=True)


if __name__ == "__main__":
    main()
