"""Batched PRM scoring of (problem, steps) pairs: the one scorer that ProcessBench, Best-of-N and
the demo share.

Each pair is encoded exactly as in training (`encode_prm`: chat prefix, each step followed by the
step token id), truncated at `max_length`, and the score of a step is P(class 1) at its step token.
Inputs are sorted by length, cut into fixed-size batches and right-padded to one of a few bucket
lengths, so a long evaluation compiles one forward per bucket, not one per batch. The batch is
sharded over the mesh's data axes, the weights by the mesh rules.

Truncation cuts the tail of a solution, so the scored steps are always a prefix of the steps: a
result shorter than the steps means the later steps' tokens were cut and those steps have no
score. A pair whose first step token was cut (a prompt longer than `max_length`) gets `[]` and
never reaches the model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prm_jax.data.prm_format import DEFAULT_STEP_TOKEN, DEFAULT_SYSTEM_PROMPT, encode_prm, resolve_step_token
from prm_jax.errors import InputError
from prm_jax.models.prm import step_probs
from prm_jax.parallel.mesh import shard_batch, state_shardings
from prm_jax.records import OutputLock, ResumableWriter

log = logging.getLogger(__name__)

Item = tuple[str, Sequence[str]]  # (problem, steps)


def bucket_lengths(max_length: int, min_bucket: int = 128, fine: bool = True) -> tuple[int, ...]:
    """Bucket lengths below `max_length`, then `max_length` itself: `min_bucket` * 2^k, and with
    `fine` also 1.5 * min_bucket * 2^k (128, 192, 256, 384, ...: padding wastes at most a third
    instead of a half, for twice the compiled shapes)."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    out, b = [], min(min_bucket, max_length)
    while b < max_length:
        out.append(b)
        if fine and b * 3 // 2 < max_length and b % 2 == 0:
            out.append(b * 3 // 2)
        b *= 2
    return tuple(out) + (max_length,)


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass(frozen=True)
class Encoded:
    ids: tuple[int, ...]  # after truncation
    step_positions: tuple[int, ...]  # positions of the step tokens that survived truncation
    n_steps: int

    @property
    def truncated(self) -> bool:
        return len(self.step_positions) < self.n_steps


def encode_item(tokenizer, problem: str, steps: Sequence[str], step_token_id: int, max_length: int,
                system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> Encoded:
    ids = encode_prm(tokenizer, problem, list(steps), step_token_id, system_prompt)
    positions = [i for i, t in enumerate(ids) if t == step_token_id]
    if len(positions) != len(steps):
        # The text itself contains the step token (e.g. a literal "<extra_0>"): scores would shift.
        raise ValueError(f"expected {len(steps)} step tokens (one per step), found {len(positions)}: the problem "
                         f"or a step contains the step token id {step_token_id} as text")
    return Encoded(tuple(ids[:max_length]), tuple(p for p in positions if p < max_length), len(steps))


def _forward(graphdef, state, ids, mask):
    return step_probs(nnx.merge(graphdef, state)(ids, mask))


@functools.lru_cache(maxsize=16)
def _jitted_forward(graphdef, mesh: Mesh | None):
    """One jitted forward per (model structure, mesh), shared by every scorer built on them, so
    repeated scoring (the demo, Best-of-N after ProcessBench) reuses compiled shapes. The output
    is replicated so every host can read all rows."""
    out = NamedSharding(mesh, P()) if mesh is not None else None
    return jax.jit(functools.partial(_forward, graphdef), out_shardings=out)


class PRMScorer:
    """Scores (problem, steps) pairs with a PRM; build once, call `score` / `iter_scores` many times
    (the jitted forward and its compiled bucket shapes are kept)."""

    def __init__(self, prm: nnx.Module, tokenizer, *, step_token: str | int = DEFAULT_STEP_TOKEN,
                 batch_size: int = 32, max_length: int = 4096, buckets: Sequence[int] | None = None,
                 mesh: Mesh | None = None, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                 tokens_per_batch: int | None = None):
        """`batch_size` rows per forward; with `tokens_per_batch` set, a bucket of length L gets
        min(batch_size, tokens_per_batch // L) rows (at least one per data shard), so a large
        batch_size serves short inputs while long ones still fit in memory. One shape per bucket."""
        self.tokenizer = tokenizer
        self.step_token_id = resolve_step_token(tokenizer, step_token)
        self.max_length = max_length
        self.buckets = tuple(sorted(buckets)) if buckets else bucket_lengths(max_length)
        if self.buckets[-1] < max_length:
            raise ValueError(f"largest bucket {self.buckets[-1]} is below max_length {max_length}")
        self.mesh = mesh
        self.system_prompt = system_prompt
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # Every data shard needs whole rows: batch sizes are multiples of data*fsdp.
        self.shards = mesh.shape["data"] * mesh.shape["fsdp"] if mesh is not None else 1
        self.batch_size = self._round(batch_size)
        self.tokens_per_batch = tokens_per_batch
        graphdef, state = nnx.split(prm)
        if mesh is not None:  # no-op when the model was already created or loaded sharded
            state = jax.device_put(state, state_shardings(state, mesh))
        self._fwd = _jitted_forward(graphdef, mesh)
        self.state = state
        self.shapes_used: set[tuple[int, int]] = set()  # (rows, length) of the forwards run

    def _round(self, rows: int) -> int:
        return max(1, -(-rows // self.shards)) * self.shards

    def rows_for(self, length: int) -> int:
        """Rows per batch for the bucket `length`."""
        if self.tokens_per_batch is None:
            return self.batch_size
        fit = (self.tokens_per_batch // length) // self.shards * self.shards
        return min(self.batch_size, max(self.shards, fit))

    def fingerprint(self) -> dict:
        """What the scores depend on: encoding settings and a checksum of the weights (sum of squares,
        compared with a relative tolerance since reduction order varies with the mesh)."""
        sumsq = jax.jit(lambda st: sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(st)))
        return {"max_length": self.max_length, "step_token_id": self.step_token_id,
                "system_prompt": self.system_prompt, "param_sumsq": float(sumsq(self.state))}

    def encode(self, problem: str, steps: Sequence[str]) -> Encoded:
        return encode_item(self.tokenizer, problem, steps, self.step_token_id, self.max_length, self.system_prompt)

    def iter_scores(self, items: Sequence[Item], progress: Callable[[int], None] | None = None
                    ) -> Iterator[tuple[int, list[float]]]:
        """Yield (index into items, step scores) as batches finish, longest inputs first.
        `progress(n)` is called with the number of items finished since the last call."""
        encoded = [self.encode(problem, steps) for problem, steps in items]
        order = []
        for i, enc in enumerate(encoded):
            if enc.step_positions:
                order.append(i)
            else:  # no step token left after truncation (or no steps): nothing to read out
                yield i, []
                if progress:
                    progress(1)
        cut = sum(e.truncated for e in encoded)
        if cut:
            empty = sum(bool(e.n_steps) and not e.step_positions for e in encoded)
            log.warning("%d of %d inputs exceed max_length=%d: their later steps get no score (%d get none at all)",
                        cut, len(encoded), self.max_length, empty)
        # Only the part up to the last surviving step token influences a score; drop the rest.
        lengths = {i: encoded[i].step_positions[-1] + 1 for i in order}
        order.sort(key=lambda i: -lengths[i])
        def read(pending):  # device -> host for a dispatched batch
            rows, probs = pending
            probs = np.asarray(jax.device_get(probs))
            return [(i, probs[r, list(encoded[i].step_positions)].astype(float).tolist()) for r, i in enumerate(rows)]

        pending, start = None, 0
        while start < len(order):
            length = pick_bucket(lengths[order[start]], self.buckets)  # the longest row of the batch
            rows_n = self.rows_for(length)
            rows = order[start:start + rows_n]
            start += rows_n
            ids = np.full((rows_n, length), self.pad_id, np.int32)
            mask = np.zeros((rows_n, length), np.int32)
            mask[:, 0] = 1  # filler rows attend to one token, so no row is fully masked
            for r, i in enumerate(rows):
                n = lengths[i]
                ids[r, :n] = encoded[i].ids[:n]
                mask[r, :n] = 1
            if (rows_n, length) not in self.shapes_used:
                self.shapes_used.add((rows_n, length))
                log.info("PRM forward shape: batch %d x length %d", rows_n, length)
            # Dispatch this batch before reading the previous one, so the host's padding and the
            # caller's writing overlap the device's work.
            dispatched = (rows, self._fwd(self.state, *shard_batch((ids, mask), self.mesh)))
            if pending is not None:
                yield from self._finish(read(pending), progress)
            pending = dispatched
        if pending is not None:
            yield from self._finish(read(pending), progress)

    @staticmethod
    def _finish(results, progress):
        yield from results
        if progress:
            progress(len(results))

    def score(self, items: Sequence[Item], progress: Callable[[int], None] | None = None) -> list[list[float]]:
        out: list[list[float] | None] = [None] * len(items)
        for i, scores in self.iter_scores(items, progress):
            out[i] = scores
        return out  # type: ignore[return-value]


def score_steps(prm: nnx.Module, tokenizer, items: Sequence[Item], batch_size: int = 32, max_length: int = 4096,
                mesh: Mesh | None = None, *, step_token: str | int = DEFAULT_STEP_TOKEN,
                buckets: Sequence[int] | None = None, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                tokens_per_batch: int | None = None) -> list[list[float]]:
    """Step scores P(correct) for every (problem, steps) pair, in input order; a list shorter than
    the steps means the later steps were truncated away (see the module docstring)."""
    scorer = PRMScorer(prm, tokenizer, step_token=step_token, batch_size=batch_size, max_length=max_length,
                       buckets=buckets, mesh=mesh, system_prompt=system_prompt,
                       tokens_per_batch=tokens_per_batch)
    return scorer.score(items)


def holding_out_dir(run: Callable) -> Callable:
    """Decorate an evaluation `run(..., out_dir, ...)` so that host 0 holds OUT/eval.lock through all
    of it: besides the resumable rows (locked by their writer), a run writes OUT/scoring.json before
    them and rewrites rows and summaries after, and a second run on OUT must not interleave with those."""
    signature = inspect.signature(run)

    @functools.wraps(run)
    def locked(*args, **kwargs):
        out_dir = signature.bind(*args, **kwargs).arguments["out_dir"]
        if jax.process_index() != 0:
            lock = contextlib.nullcontext()
        else:
            os.makedirs(out_dir, exist_ok=True)
            lock = OutputLock(out_dir, os.path.join(out_dir, "eval.lock"))
        with lock:
            return run(*args, **kwargs)

    return locked


def check_resume(scorer: PRMScorer, out_dir: str, name: str = "scoring.json") -> None:
    """Refuse to resume into an OUT scored by another model or with other encoding settings:
    scores already there would silently mix. Writes OUT/<name> on the first run."""
    path = os.path.join(out_dir, name)
    now = scorer.fingerprint()  # every host takes part in the (sharded) checksum
    if jax.process_index() != 0:
        return
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
        diff = [k for k in now if k != "param_sumsq" and before.get(k) != now[k]]
        b = before.get("param_sumsq")
        if b is None or abs(b - now["param_sumsq"]) > 1e-4 * max(abs(b), 1e-12):
            diff.append("weights (param_sumsq)")
        if diff:
            raise InputError(f"{path}: {out_dir} holds scores from a different PRM or settings (differs in: "
                             f"{', '.join(diff)}); use a new --out or remove it")
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(now, f, indent=2)


def same_on_all_hosts(todo: Sequence[bool]) -> list[bool]:
    """Host 0's to-do mask on every host: the forward is one SPMD program, so all hosts must run the
    same batches, while only host 0 reads and writes the resumable output."""
    if jax.process_count() == 1:
        return list(todo)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(todo, np.bool_))).tolist()


def open_resumable_scores(scorer: PRMScorer, out_dir: str, name: str, key: str, items: Sequence,
                          key_of: Callable) -> tuple[ResumableWriter | None, list]:
    """The resumable output OUT/name (opened on host 0 only; None elsewhere) and the items still to
    score, the same list on every host. Refuses an OUT scored with another model or settings."""
    os.makedirs(out_dir, exist_ok=True)
    check_resume(scorer, out_dir)
    writer = ResumableWriter(os.path.join(out_dir, name), key=key) if jax.process_index() == 0 else None
    done = writer.done if writer else set()
    todo = [x for x, t in zip(items, same_on_all_hosts([key_of(x) not in done for x in items])) if t]
    return writer, todo


def score_into(scorer: PRMScorer, writer: ResumableWriter | None, todo: Sequence, row_of: Callable,
               desc: str, unit: str, show_progress: bool = True) -> None:
    """Score `todo` (items with .problem and .steps) and write `row_of(item, scores)` as each
    finishes (host 0 writes; every host scores), with a progress bar; closes the writer."""
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc=desc, unit=unit, disable=not (show_progress and writer is not None))
    try:
        for i, scores in scorer.iter_scores([(x.problem, x.steps) for x in todo], bar.update):
            if writer:
                writer.write(row_of(todo[i], scores))
    finally:
        bar.close()
        if writer:
            writer.close()
