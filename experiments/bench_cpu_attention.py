"""One layer's attention on CPU: the kernels of `prm_jax.models.cpu_kernels` vs XLA:CPU's own path for the same
function (what runs where the kernel cannot), on the small Qwen2 shape (8 heads, 2 kv heads, head size 64).

- scoring: bf16 causal attention of a full forward ([rows, tokens], every token real), XLA's 16 causal blocks vs
  the kernel in one call; GFLOP/s on the causal half (2 x 2 x T^2/2 x heads x head_dim per row).
- decode: one f32 query per row against a 768-slot f32 cache filled to a random depth per row (uniform up to
  `filled`), as the sampler's decode step; GB/s of the K/V the step must read (the filled part).

Both sides are jitted separately, run alternately, medians of --repeats.

    python experiments/bench_cpu_attention.py [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from prm_jax.models import attention as A
from prm_jax.models import cpu_kernels

HEADS, KV, D = 8, 2, 64


def timed(fns: dict, args, repeats: int) -> dict:
    for f in fns.values():
        jax.block_until_ready(f(*args))
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in ts.items()}


def xla(kernel_check: str, fn):
    """fn traced with the kernel off (its own jit, so its trace is not shared with the kernel's)."""
    def run(*args):
        saved = getattr(cpu_kernels, kernel_check)
        setattr(cpu_kernels, kernel_check, lambda *a: False)
        try:
            return fn(*args)
        finally:
            setattr(cpu_kernels, kernel_check, saved)
    return jax.jit(run)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if not cpu_kernels.available():
        print("the CPU kernels are not available here (x86 Linux with AVX-512 BF16 and g++ needed)")
        return 1
    rng = np.random.default_rng(0)
    print("scoring, bf16 causal attention, one layer: XLA (16 blocks) | kernel (one call) | kernel/XLA speed")
    for rows, t in ((16, 512), (8, 1024), (4, 2048), (2, 4096)):
        q = jnp.asarray(rng.normal(size=(rows, t, HEADS, D)), jnp.bfloat16)
        k, v = (jnp.asarray(rng.normal(size=(rows, KV, t, D)), jnp.bfloat16) for _ in range(2))
        mask = jnp.asarray(np.broadcast_to(np.tril(np.ones((t, t), bool)), (rows, t, t)))
        got = timed({"xla": xla("attention_applies", A.causal_attention),
                     "kernel": jax.jit(lambda *a: A.causal_attention(*a))}, (q, k, v, mask), args.repeats)
        flops = rows * HEADS * D * 4 * t * t / 2
        print(f"  [{rows:2d}, {t:4d}]  XLA {got['xla'] * 1e3:7.1f} ms ({flops / got['xla'] / 1e9:4.0f} GFLOP/s) | "
              f"kernel {got['kernel'] * 1e3:6.1f} ms ({flops / got['kernel'] / 1e9:4.0f} GFLOP/s) | "
              f"{got['xla'] / got['kernel']:.2f}x", flush=True)
    print("decode, f32, one layer, 768-slot cache: XLA | kernel | kernel/XLA speed")
    for rows, filled in ((64, 700), (64, 128), (16, 700)):
        q = jnp.asarray(rng.normal(size=(rows, 1, HEADS, D)), jnp.float32)
        k, v = (jnp.asarray(rng.normal(size=(rows, KV, 768, D)), jnp.float32) for _ in range(2))
        depth = rng.integers(1, filled + 1, size=rows)
        mask = jnp.asarray((np.arange(768)[None] < depth[:, None])[:, None, :])
        got = timed({"xla": xla("decode_applies", A.decode_attention),
                     "kernel": jax.jit(lambda *a: A.decode_attention(*a))}, (q, k, v, mask), args.repeats)
        nbytes = 2 * KV * D * 4 * depth.sum()
        print(f"  {rows:2d} rows, filled up to {filled:3d}  XLA {got['xla'] * 1e3:6.2f} ms | kernel "
              f"{got['kernel'] * 1e3:5.2f} ms ({nbytes / got['kernel'] / 1e9:4.1f} GB/s of filled K/V) | "
              f"{got['xla'] / got['kernel']:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
