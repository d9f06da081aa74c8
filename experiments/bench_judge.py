"""Judge client throughput against the loopback fixture server.

The fixture (tests/judge_fixture.py, run as its own process) answers every request after a fixed
latency and injects faults (500, 429, truncated JSON, dropped connections) at a given rate. With
`concurrency` requests in flight and `latency` seconds each, the ideal is concurrency / latency
judged records per second; we report the measured rate (median over repeats), the ideal and the
ratio. Each repeat judges a fresh set (fresh output and reply cache), so nothing comes from cache.

    python experiments/bench_judge.py                       # 50 ms, 1% faults, concurrency 64
    python experiments/bench_judge.py --api sglang --records 3000
    python experiments/bench_judge.py --latency 2 --concurrency 256 --records 2048   # a real judge's latency
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from prm_jax.labeling.judge import judge_solutions, load_template  # noqa: E402
from prm_jax.labeling.solutions import Solution  # noqa: E402
from prm_jax.labeling.judge_clients import OpenAIClient, RetryPolicy, SamplingParams, SGLangClient  # noqa: E402


def start_fixture(latency: float, fault_rate: float, kinds: str, seed: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "judge_fixture.py"), "--latency", str(latency),
                             "--fault-rate", str(fault_rate), "--fault-kinds", kinds, "--seed", str(seed)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"fixture did not start: {line!r}")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}"


def solutions(n: int, rep: int) -> list[Solution]:
    # distinct problems per repeat so no reply could come from a cache
    return [Solution({"id": i, "problem": f"Bench {rep}/{i}: what is {i} + {rep}? [first_error={i % 5 - 1}]",
                      "steps": [f"We add {i} and {rep}.", f"{i} + {rep} = {i + rep}.", "The answer follows.",
                                f"So the answer is \\boxed{{{i + rep}}}."]}, f"bench:{i}") for i in range(n)]


async def one_run(args, url: str, rep: int, tokenizer) -> tuple[float, dict]:
    sampling = SamplingParams(max_new_tokens=512)
    retry = RetryPolicy(max_retries=8, base_delay=0.05, max_delay=1.0)
    if args.api == "openai":
        client = OpenAIClient(url, "bench-judge", sampling, concurrency=args.concurrency, timeout=30, retry=retry,
                              seed=rep)
    else:
        client = SGLangClient(url, "bench-judge", sampling, tokenizer=tokenizer, concurrency=args.concurrency,
                              timeout=30, retry=retry, seed=rep)
    sols = solutions(args.records, rep)
    with tempfile.TemporaryDirectory() as d:
        async with client:
            t0, c0 = time.perf_counter(), time.process_time()
            s = await judge_solutions(sols, client, out_path=os.path.join(d, "out.jsonl"), template=load_template(),
                                      model="bench-judge", progress=False)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    if s.judged != args.records or s.unparsed:
        raise RuntimeError(f"bench run incomplete: {s.lines()}")
    return s.judged / dt, {"client_cpu_ms_per_record": round(1000 * cpu / s.judged, 3), "requests": s.requests, "retries": s.retries, "failed": s.failed,
                           "errors": dict(client.counters.errors)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--api", choices=("openai", "sglang"), default="openai")
    p.add_argument("--latency", type=float, default=0.05)
    p.add_argument("--fault-rate", type=float, default=0.01)
    p.add_argument("--fault-kinds", default="500,429,truncated,disconnect")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--records", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--uvloop", action="store_true", help="run the client on uvloop (if installed)")
    args = p.parse_args()

    tokenizer = None
    if args.api == "sglang":
        from prm_jax.toyworld.tokenizer import train_tokenizer

        tok_dir = tempfile.mkdtemp(prefix="bench_tok_")
        tokenizer = train_tokenizer(["Bench what is the answer step add so"] * 50, tok_dir, vocab_size=300)

    proc, url = start_fixture(args.latency, args.fault_rate, args.fault_kinds, seed=0)
    runner = asyncio.run
    if args.uvloop:
        import uvloop
        runner = uvloop.run
    try:
        rates, infos = [], []
        for rep in range(args.repeats):
            rate, info = runner(one_run(args, url, rep, tokenizer))
            rates.append(rate)
            infos.append(info)
            print(f"  repeat {rep}: {rate:.1f} records/s  {info}", flush=True)
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    ideal = args.concurrency / args.latency
    med = statistics.median(rates)
    print(f"judge bench: api={args.api}{' uvloop' if args.uvloop else ''} "
          f"concurrency={args.concurrency} latency={args.latency * 1000:.0f} ms "
          f"faults={args.fault_rate:.0%} records={args.records} repeats={args.repeats}")
    print(f"measured (median): {med:.1f} judged records/s")
    print(f"ideal (concurrency / latency): {ideal:.1f} records/s")
    print(f"ratio: {med / ideal:.3f} (target >= 0.80)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
