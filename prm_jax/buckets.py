"""Shape buckets: the ladders of padded sizes that bound how many programs jit compiles.

A jitted function compiles once per input shape, so every batch is padded up to a bucket: a
sequence length from a length ladder, a row count from a row ladder. A coarser ladder compiles
fewer programs and pads more. Each ladder below is the trade one kind of program makes; they
differ on purpose, and changing one changes the compiled shapes (and the test suite's time).

Length ladders, up to max_length (which is always the last bucket); `pick_bucket` chooses from one:
- `coarse_buckets`: training's default (`data.pipeline`): about 7 lengths, since each one
  compiles a train step (forward and backward).
- `octave_buckets`: the scorer's (`evaluation.scoring`): `per_octave` lengths per doubling, so a
  row pads by at most 1/per_octave; a forward compiles fast. The server compiles its whole
  ladder before it serves, so it takes per_octave=1.
Size ladders, for counts and lengths without a fixed maximum:
- `size_bucket`: the sampler's batch sizes and its prompt, new-token, stop-table and cache
  lengths: 1, 2, 3, 4, 6, 8, 12, ... (steps of 1.5x: less padding than doubling, for twice the
  programs); `batch_bucket` rounds it up to a multiple of the data-parallel ways.
- `row_ladder`: the scorer's row counts, shards * 2^k up to a maximum.
"""
from __future__ import annotations

from collections.abc import Sequence


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest of the (ascending) `buckets` that holds `length`."""
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def coarse_buckets(max_length: int) -> tuple[int, ...]:
    """Padded lengths growing by x1.5 / x1.33 from max_length/8 up to max_length (e.g. 64, 96, 128,
    192, 256, 384, 512 for 512), multiples of 8: a batch pads at most ~1/3 beyond its longest row
    while the step compiles for only ~7 shapes."""
    out, b = {max_length}, max(8, max_length // 8)
    while b < max_length:
        out.add(-(-b // 8) * 8)
        b = b * 3 // 2 if (b & (b - 1)) == 0 else b * 4 // 3  # 2^k -> 1.5*2^k -> 2^(k+1)
    return tuple(sorted(x for x in out if x <= max_length))


def octave_buckets(max_length: int, per_octave: int = 8, min_step: int = 32) -> tuple[int, ...]:
    """Bucket lengths up to `max_length` (which is always the last): multiples of `min_step` up to
    `per_octave * min_step`, then `per_octave` evenly spaced lengths per doubling (512, 576, 640, ...),
    so a row is padded by at most 1/per_octave of its length beyond the smallest bucket."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    out, b = [], min_step
    while b < max_length:
        out.append(b)
        step = max(min_step, (1 << (b.bit_length() - 1)) // per_octave)  # power of two <= b, / per_octave
        b += step
    return tuple(out) + (max_length,)


def size_bucket(n: int, minimum: int = 1) -> int:
    """Smallest size >= max(n, minimum) in {2^k, 3 * 2^(k-1)} (1, 2, 3, 4, 6, 8, 12, 16, 24, ...)."""
    n = max(n, minimum, 1)
    p = 1
    while p < n:
        if p >= 2 and p // 2 * 3 >= n:
            return p // 2 * 3
        p *= 2
    return p


def batch_bucket(n: int, dp: int) -> int:
    """Rows for a batch of `n` over `dp` data-parallel ways: size_bucket(n, dp) rounded up to a multiple of dp."""
    b = size_bucket(n, dp)
    return -(-b // dp) * dp


def row_ladder(max_rows: int, shards: int = 1) -> tuple[int, ...]:
    """Allowed row counts up to `max_rows` (a multiple of `shards`): shards * 2^k, and max_rows."""
    out, r = [], shards
    while r < max_rows:
        out.append(r)
        r *= 2
    return tuple(out) + (max_rows,)
