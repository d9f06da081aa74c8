"""`prm-jax serve` throughput and latency against offline scoring of the same requests.

    python experiments/bench_serve.py [--prm DIR | --hidden 256 --layers 4] [--requests 512] [--clients 64]
                                      [--max-length 512] [--batch-size 16] [--max-wait-ms 5]

Offline: `PRMScorer.score` over all N (problem, steps) pairs in one call (the `prm-jax eval` path), after
compiling every bucket. Served: the same pairs, one `POST /pooling` each (token ids, as vLLM clients send
them), from `--clients` concurrent loopback clients in a separate process (so client-side JSON work does
not share the server's GIL), against the server in this process (same scorer settings, compiled buckets).
Each served answer is checked against the offline scores. Prints requests/s of both, their ratio (the
issue's target: >= 0.8) and the p50/p99 request latency the clients saw.

Without --prm a random PRM (Qwen2 shape, --hidden/--layers) on a toy BPE tokenizer is used; inputs are
synthetic arithmetic solutions with 2 to 8 steps (ragged lengths, ~150 to ~400 tokens).

Measured (CPU, 2 cores shared with other jobs, hidden 256 x 4 layers, 384 requests, 64 clients, numbers
vary by ~15% run to run): offline 15.4 req/s, served 13.7 req/s (ratio 0.89), p50 4.7 s, p99 5.6 s;
served answers equal offline to 6e-8. With --batch-size 64 the ratio fell to 0.29: closed-loop clients
come back in waves of ~32, and a forward is always padded to --batch-size rows (one compiled shape per
bucket) and to the bucket of its longest input, so rows per forward must sit well below the number of
concurrent requests; the scorer then sorts each gathered batch by length into tightly bucketed forwards.
No GPU was lent to this run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import numpy as np


def _client_main(url: str, path: str, clients: int) -> None:
    """Child process: send every request in `path` (a JSON list of id lists) from `clients` concurrent
    sessions; write [{"k", "latency_s", "p_right"}] plus the wall time to path + ".out"."""
    import aiohttp

    with open(path) as f:
        inputs = json.load(f)
    todo = list(range(len(inputs)))[::-1]
    results = []

    async def worker(session):
        while todo:
            k = todo.pop()
            t0 = time.perf_counter()
            async with session.post(url + "/pooling", json={"input": inputs[k]}) as r:
                body = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"request {k}: HTTP {r.status}: {body}")
            results.append({"k": k, "latency_s": time.perf_counter() - t0,
                            "p_right": [p for _, p in body["data"][0]["data"]]})

    async def main():
        conn = aiohttp.TCPConnector(limit=clients)
        async with aiohttp.ClientSession(connector=conn) as session:
            # one warm-up request per connection, untimed
            await asyncio.gather(*(session.post(url + "/pooling", json={"input": inputs[i % len(inputs)]})
                                   for i in range(clients)))
            t0 = time.perf_counter()
            await asyncio.gather(*(worker(session) for _ in range(clients)))
            return time.perf_counter() - t0

    wall = asyncio.run(main())
    with open(path + ".out", "w") as f:
        json.dump({"wall_s": wall, "results": results}, f)


def synthetic_items(n: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        steps, x = [], a
        for _ in range(rng.randint(2, 8)):
            y = rng.randint(2, 30)
            op = rng.choice("+-*")
            z = x + y if op == "+" else x - y if op == "-" else x * y
            steps.append(f"We compute {x} {op} {y} = {z}, which we keep for the next step of the solution.")
            x = z
        steps.append(f"The answer is \\boxed{{{x}}}.")
        items.append((f"Start with {a} apples, then follow the operations with {b} in mind. What is the result?",
                      steps))
    return items


def build(args):
    from flax import nnx
    from transformers import AutoTokenizer

    from prm_jax.models.prm import Qwen2PRM
    from prm_jax.models.qwen2 import Qwen2Config
    from prm_jax.parallel.mesh import make_mesh

    mesh = make_mesh(args.mesh)
    if args.prm:
        from prm_jax.models.hf import load_prm, load_tokenizer

        return load_prm(args.prm, mesh=mesh), load_tokenizer(args.tokenizer or args.prm), mesh
    from prm_jax.toyworld.tokenizer import train_tokenizer

    out = tempfile.mkdtemp(prefix="bench_serve_tok_")
    texts = [p + " " + " ".join(s) for p, s in synthetic_items(200, seed=99)]
    train_tokenizer(texts, out, vocab_size=512)
    tok = AutoTokenizer.from_pretrained(out)
    cfg = Qwen2Config.preset("tiny", vocab_size=len(tok) + 1, hidden_size=args.hidden,
                             intermediate_size=4 * args.hidden, num_layers=args.layers,
                             num_heads=max(1, args.hidden // 64), num_kv_heads=max(1, args.hidden // 128))
    return Qwen2PRM(cfg, nnx.Rngs(0)), tok, mesh


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prm", default=None, help="a PRM directory (default: a random one, --hidden/--layers)")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--mesh", default=None)
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-batch-tokens", type=int, default=32768)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--client-of", default=None, help=argparse.SUPPRESS)  # child mode: URL
    ap.add_argument("--inputs", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client_of:
        return _client_main(args.client_of, args.inputs, args.clients)

    import jax

    from prm_jax.data.prm_format import encode_prm
    from prm_jax.rewards import StepReward
    from prm_jax.serving.batcher import BatchConfig, Batcher, EncodedScorer, warm_up
    from prm_jax.serving.server import BackgroundServer, ServeConfig, make_app

    prm, tok, mesh = build(args)
    items = synthetic_items(args.requests)
    kw = dict(batch_size=args.batch_size, max_length=args.max_length, mesh=mesh,
              tokens_per_batch=args.max_batch_tokens)
    offline = EncodedScorer(prm, tok, **kw)  # PRMScorer, also taking pre-encoded items
    ids = [encode_prm(tok, p, s, offline.step_token_id) for p, s in items]
    lengths = [len(x) for x in ids]
    print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}; {args.requests} requests, "
          f"{min(lengths)}-{max(lengths)} tokens (mean {np.mean(lengths):.0f}); batch {args.batch_size}, "
          f"max_batch_tokens {args.max_batch_tokens}, max_wait {args.max_wait_ms} ms; {args.clients} clients")
    offline.score(items)  # compile the buckets the requests use
    t0 = time.perf_counter()
    ref = offline.score(items)
    with_tok_s = time.perf_counter() - t0
    # The same token ids the clients send, so neither side pays for tokenizing: the forward path alone.
    pre = [(offline.encode(p, s), None) for p, s in items]
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        offline.score(pre)
        times.append(time.perf_counter() - t0)
    off_s = min(times)

    scorer = EncodedScorer(prm, tok, **kw)
    warm_up(scorer)
    batcher = Batcher(scorer, BatchConfig(args.max_batch_tokens, args.max_wait_ms, max_queue=4 * args.clients))
    app = lambda: make_app(batcher, StepReward(scorer), ServeConfig("bench", max_body_bytes=64 << 20))  # noqa: E731
    with BackgroundServer(app) as server, tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "inputs.json")
        with open(path, "w") as f:
            json.dump(ids, f)
        before = batcher.batches
        subprocess.run([sys.executable, __file__, "--client-of", server.url, "--inputs", path,
                        "--clients", str(args.clients)], check=True)
        batches = batcher.batches - before - 1  # less the warm-up round's batch (or so)
        with open(path + ".out") as f:
            served = json.load(f)
    worst = max(float(np.max(np.abs(np.asarray(r["p_right"]) - ref[r["k"]]))) for r in served["results"])
    lat = np.asarray([r["latency_s"] for r in served["results"]]) * 1000
    off_rps, srv_rps = args.requests / off_s, args.requests / served["wall_s"]
    print(f"offline  {args.requests} in {off_s:.2f} s = {off_rps:.1f} req/s on token ids (best of {len(times)}: "
          + ", ".join(f"{t:.2f}" for t in times) + f" s); {args.requests / with_tok_s:.1f} req/s tokenizing too")
    print(f"served   {args.requests} in {served['wall_s']:.2f} s = {srv_rps:.1f} req/s in ~{batches} batches; "
          f"latency p50 {np.percentile(lat, 50):.0f} ms, p99 {np.percentile(lat, 99):.0f} ms")
    print(f"ratio    served/offline = {srv_rps / off_rps:.2f} (target >= 0.8); max |served - offline| = {worst:.1e}")
    print(json.dumps({"offline_rps": off_rps, "served_rps": srv_rps, "ratio": srv_rps / off_rps,
                      "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                      "max_abs_diff": worst, "device": jax.devices()[0].device_kind}))


if __name__ == "__main__":
    main()
