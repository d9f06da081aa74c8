"""Batch planning for PRM scoring: which inputs share a forward, and at what (rows, length) shape.

Pure functions over input lengths, so the plan (and the padding it costs) can be checked by hand.

A batch is padded to a bucket length (the bucket of its longest row) and to a row count from a
short ladder (powers of two times the data shards, plus the most a bucket may hold; both ladders
are `prm_jax.buckets`'), so the compiled shapes are bounded by buckets x ladder and reused across calls. Rows x length never
exceeds the token budget (a single row longer than the budget still gets its own batch).
Within those rules, a dynamic programme over the inputs sorted by length picks the cut that
computes the fewest positions (real tokens + padding), plus a small per-batch charge so a run is
not shredded into tiny forwards that underuse the device.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from prm_jax.buckets import pick_bucket, row_ladder

# Positions a batch is charged on top of the ones it computes: a dispatch and the short-matmul
# inefficiency of a small batch cost about this much on XLA:CPU (a forward of 64 tokens runs at
# about half the rate of one of 2k); it only decides ties between near-equal cuts.
BATCH_OVERHEAD = 128


@dataclasses.dataclass(frozen=True)
class Batch:
    items: tuple[int, ...]  # indices into the planned inputs, longest first
    rows: int  # rows of the forward (>= len(items); the rest are filler rows)
    length: int  # bucket length

    @property
    def positions(self) -> int:
        """Positions the forward computes: rows x length."""
        return self.rows * self.length


@dataclasses.dataclass(frozen=True)
class BatchRules:
    buckets: tuple[int, ...]
    max_rows: int  # rows per forward at most (a multiple of shards)
    tokens_per_batch: int | None = None  # rows x length at most (None: no cap)
    shards: int = 1  # every data shard needs whole rows: row counts are multiples of this
    overhead: int = BATCH_OVERHEAD

    def rows_for(self, length: int) -> int:
        """The most rows a batch of bucket `length` may have."""
        if self.tokens_per_batch is None:
            return self.max_rows
        fit = (self.tokens_per_batch // length) // self.shards * self.shards
        return min(self.max_rows, max(self.shards, fit))

    def shapes(self) -> set[tuple[int, int]]:
        """Every (rows, length) a plan can use: the bound on compiled shapes."""
        return {(r, b) for b in self.buckets for r in row_ladder(self.rows_for(b), self.shards)}


def plan_batches(lengths: Sequence[int], rules: BatchRules) -> list[Batch]:
    """Cut the inputs (their lengths, in any order) into batches computing the fewest positions.
    Every index appears in exactly one batch; batches come longest first."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    n = len(order)
    best = np.zeros(n + 1, np.int64)  # best[i]: least cost of batching order[i:]
    choice = np.zeros(n, np.int64)  # items in the batch that starts at i
    for i in range(n - 1, -1, -1):
        length = pick_bucket(lengths[order[i]], rules.buckets)
        ladder = np.asarray(row_ladder(rules.rows_for(length), rules.shards))
        k = np.arange(1, min(int(ladder[-1]), n - i) + 1)
        rows = ladder[np.searchsorted(ladder, k)]  # smallest allowed row count >= k
        cost = rows * length + rules.overhead + best[i + k]
        j = int(np.argmin(cost))
        best[i], choice[i] = cost[j], k[j]
    out, i = [], 0
    while i < n:
        k = int(choice[i])
        length = pick_bucket(lengths[order[i]], rules.buckets)
        ladder = row_ladder(rules.rows_for(length), rules.shards)
        rows = next(r for r in ladder if r >= k)
        out.append(Batch(tuple(order[i:i + k]), rows, length))
        i += k
    return out


def padding_share(lengths: Sequence[int], batches: Sequence[Batch]) -> float:
    """Share of the computed positions that were padding (filler rows included)."""
    computed = sum(b.positions for b in batches)
    return 1.0 - sum(lengths[i] for b in batches for i in b.items) / computed if computed else 0.0
