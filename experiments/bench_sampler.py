"""Sampler benchmark: prm_jax.generate vs transformers generate, and the Monte-Carlo rollout workload.

Both engines hold identical weights (Qwen2Config.small(), random init, copied into a transformers
Qwen2ForCausalLM in float32). Every figure is the median over --repeats warm runs; the first
(compiling) run of each of our programs is timed separately and reported as compile time.
Stopping is disabled on both sides (no stop ids / eos None + min_new_tokens), so both engines
produce exactly the requested number of tokens.

  python experiments/bench_sampler.py [--repeats 3] [--parts gen,mc] [--threads N]

--threads 1 runs both engines on one thread (XLA and torch), which is far less sensitive to load
from other processes than two threads that must meet at every barrier (on a busy 2-core machine
transformers' two OpenMP threads slow down much more than XLA's).
Compile time is the sum of JAX's own trace + lower + backend-compile durations (jax.monitoring).

Parts:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", default="gen,mc")
    ap.add_argument("--threads", type=int, default=0, help="1: single-threaded XLA and torch (0: defaults)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = Qwen2ForCausalLM(Qwen2Config.small(), nnx.Rngs(0))
    hf = to_transformers(model)
    print(f"devices: {jax.devices()} | torch threads: {torch.get_num_threads()} | XLA_FLAGS="
          f"{os.environ.get('XLA_FLAGS', '')!r} | load average {os.getloadavg()[0]:.1f}")
    parts = args.parts.split(",")
    if "gen" in parts:
        bench_generate(model, hf, args.repeats)
    if "mc" in parts:
        bench_mc(model, hf, args.repeats)
    print(f"sampler programs compiled in total: {sampler.compile_count()} | load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
