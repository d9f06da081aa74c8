"""Batched PRM scoring of (problem, steps) pairs: the one scorer that ProcessBench, Best-of-N,
search, the server and the demo share.

Each pair is encoded exactly as in training (`encode_prm`: chat prefix, each step followed by the
step token id), truncated at `max_length`, and the score of a step is P(class 1) at its step token.
Inputs are sorted by length and cut into batches by a token budget (rows x bucket length), padded to
one of a fine ladder of bucket lengths (`prm_jax.buckets.octave_buckets`) and row counts chosen to
compute the fewest padding positions (`prm_jax.evaluation.batching`), so a long evaluation compiles
a bounded set of shapes and reuses them.
A background thread tokenizes, plans and builds the next batches while the device runs; JAX's async
dispatch lets the next forward start before the previous one's rewards are read out. The batch is
sharded over the mesh's data axes, the weights by the mesh rules; on one CPU device a forward runs
its rows a cache-sized group at a time (`GROUP_TOKENS`). The last layer runs its queries and MLP at
the step tokens alone (`step_slots`). `PRMScorer.last_stats` reports the padding share and the
timings of a call.

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
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prm_jax.buckets import octave_buckets, pick_bucket
from prm_jax.data.prm_format import DEFAULT_STEP_TOKEN, DEFAULT_SYSTEM_PROMPT, encode_prm, resolve_step_token
from prm_jax.errors import InputError
from prm_jax.evaluation.batching import BatchRules, plan_batches
from prm_jax.models import cpu_kernels
from prm_jax.models.prm import step_probs
from prm_jax.parallel.mesh import batch_ways, shard_batch, state_shardings
from prm_jax.records import OutputLock, ResumableWriter

log = logging.getLogger(__name__)

Item = tuple[str, Sequence[str]]  # (problem, steps)


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


@dataclasses.dataclass
class ScoringStats:
    """What one scoring call computed and where its host time went (`PRMScorer.last_stats`)."""
    items: int = 0
    scored: int = 0  # items that reached the model (the rest had no step token left)
    truncated: int = 0  # items cut at max_length
    real_tokens: int = 0  # tokens up to each scored item's last step token: the work that was asked for
    positions: int = 0  # rows x length summed over the forwards: the work that was done
    batches: int = 0
    new_shapes: int = 0  # forward shapes this call compiled
    wall_s: float = 0.0
    host_s: float = 0.0  # tokenizing, planning and building batches (the background thread)
    wait_s: float = 0.0  # the caller's thread blocked on a forward's result

    @property
    def padding_share(self) -> float:
        """Share of the computed positions that were padding (filler rows included)."""
        return 1.0 - self.real_tokens / self.positions if self.positions else 0.0

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "padding_share": self.padding_share}

    def line(self) -> str:
        tps = self.real_tokens / self.wall_s if self.wall_s else 0.0
        return (f"scored {self.scored} of {self.items} inputs, {self.real_tokens} tokens in {self.batches} forwards "
                f"({self.new_shapes} new shapes), padding {100 * self.padding_share:.1f}% of {self.positions} "
                f"positions, {self.wall_s:.2f} s ({tps:.0f} tok/s; host work {self.host_s:.2f} s in the background)")


def _forward(graphdef, state, ids, mask, slots):
    return step_probs(nnx.merge(graphdef, state)(ids, mask, score_positions=slots))


def _forward_split(graphdef, state, head, ids, mask, slots):
    """Backbone in its own (low-precision) dtype; final hidden states to f32 for the score head and
    the softmax, so the only bf16 rounding is inside the backbone."""
    hidden = nnx.merge(graphdef, state)(ids, mask, only=slots).astype(jnp.float32)
    logits = jax.nn.relu(hidden @ head["w_in"] + head["b_in"]) @ head["w_out"] + head["b_out"]
    return step_probs(logits)


def step_slots(length: int) -> int:
    """How many step positions a row of this bucket length reads out. A forward reads the scores at
    these alone, so its last layer runs its queries and MLP there rather than at every position (the
    small PRM's bf16 scoring forward: +10-20%). An input with more steps runs the last layer everywhere.
    A function of the length alone, so the compiled shapes stay those of the batch plan; at least 64,
    since XLA:CPU's row reductions (RMSNorm) over fewer rows round differently as the batch's row count
    changes, and an input's scores must not depend on its batch."""
    return min(length, max(64, length // 8))


# On one CPU device a forward runs its rows a group at a time (lax.map over groups of at most
# GROUP_TOKENS tokens), so that every intermediate (a layer's activations, the MLP's f32 products, a query
# block's attention scores) stays in the core's caches instead of going to memory and back in each of its
# passes. The small PRM's forward, tok/s, whole batch -> groups of 1024 tokens (512: within 5% of it):
# bf16 [64, 128] 7928 -> 10608, [32, 256] 8265 -> 11997, [8, 1024] 6086 -> 9034, [4, 2048] 4521 -> 5886,
# [2, 4096] 2992 -> 2825 (one row a group); f32 +10-17% on all five
# (experiments/notes/2026-12-06-scoring-in-row-groups.md). Not on accelerators, where a loop would idle
# the chip, nor over several devices, whose shards of the batch it would visit one after the other.
GROUP_TOKENS = 1024


def group_rows(rows: int, length: int, group_tokens: int) -> int:
    """Rows per group: the largest divisor of `rows` whose rows hold at most `group_tokens` tokens (at
    least 1); all of them when `group_tokens` is 0."""
    if not group_tokens:
        return rows
    return max(r for r in range(1, rows + 1) if rows % r == 0 and (r == 1 or r * length <= group_tokens))


def _in_row_groups(forward: Callable, group_tokens: int) -> Callable:
    """forward(*weights, ids, mask, slots) computed `group_rows` rows at a time (slots: None or [B, K])."""
    def run(*args):
        *weights, ids, mask, slots = args
        b, t = ids.shape
        r = group_rows(b, t, group_tokens)
        if r == b:
            return forward(*weights, ids, mask, slots)
        groups = jax.tree.map(lambda x: x.reshape(b // r, r, *x.shape[1:]), (ids, mask, slots))
        out = jax.lax.map(lambda a: forward(*weights, *a), groups)
        return out.reshape(b, *out.shape[2:])
    return run


def default_group_tokens(mesh: Mesh | None) -> int:
    """GROUP_TOKENS on one CPU device, else 0 (whole batches)."""
    one_device = mesh is None or mesh.devices.size == 1
    return GROUP_TOKENS if jax.default_backend() == "cpu" and one_device else 0


@functools.lru_cache(maxsize=16)
def _jitted_forward(graphdef, mesh: Mesh | None, split_head: bool, group_tokens: int):
    """One jitted forward per (model structure, mesh, ...), shared by every scorer built on them, so
    repeated scoring (the demo, Best-of-N after ProcessBench) reuses compiled shapes. The output
    is replicated so every host can read all rows."""
    out = NamedSharding(mesh, P()) if mesh is not None else None
    forward = functools.partial(_forward_split if split_head else _forward, graphdef)
    return jax.jit(_in_row_groups(forward, group_tokens), out_shardings=out)


SCORING_DTYPES = ("float32", "bfloat16")


def default_scoring_dtype(platform: str | None = None) -> str:
    """The faster of f32 and bf16 scoring at equal rankings, per platform (experiments/bench_eval.py):
    accelerators run bf16 matmuls at several times their f32 rate, and so does XLA:CPU on a CPU with AMX
    tiles, for products asked for in f32 (`models.linear.dot`): the small PRM scored ProcessBench at
    6,000-9,000 tok/s in bf16 against 3,100-4,100 in f32 (three runs) on 2 cores of a Xeon with AMX, step scores within
    5e-3, no two solutions more than 0.03 apart reordered. On a CPU with AVX-512 BF16, where attention runs in
    `models.cpu_kernels`, bf16 scored at 5,000-5,800 tok/s against 3,100-3,850 in f32 on 2 cores of an AMD EPYC
    (Zen 4), again with no pair reordered. Other CPUs keep f32, the exact one (bf16 is unmeasured there)."""
    platform = platform or jax.default_backend()
    fast_cpu = platform == "cpu" and (cpu_has_amx() or cpu_kernels.available())
    return "bfloat16" if platform in ("gpu", "tpu") or fast_cpu else "float32"


def cpu_has_amx() -> bool:
    """Whether this machine's CPU has AMX bf16 tiles."""
    return cpu_kernels.cpu_has_flag("amx_bf16")


def _mixed_precision(prm: nnx.Module, dtype: str):
    """(graphdef, state) of prm's backbone computing in `dtype` (matrices stored in it; vectors, i.e.
    biases and norm scales, kept f32), and its score head's weights in f32."""
    model_cfg = prm.model.cfg.replace(dtype=dtype, param_dtype=dtype)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: type(prm.model)(model_cfg, nnx.Rngs(0))))
    low = jnp.dtype(dtype)
    state = jax.tree.map(lambda x: x.astype(low) if x.ndim >= 2 else x.astype(jnp.float32), nnx.state(prm.model))
    f32 = lambda p: p[...].astype(jnp.float32)  # noqa: E731
    head = {"w_in": f32(prm.score.dense_in.kernel), "b_in": f32(prm.score.dense_in.bias),
            "w_out": f32(prm.score.dense_out.kernel), "b_out": f32(prm.score.dense_out.bias)}
    return graphdef, state, head


def _sumsq(state) -> float:
    return float(jax.jit(lambda st: sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(st)))(state))


def _chunks(n: int, first: int = 128, most: int = 4096) -> Iterator[range]:
    """Index ranges to encode and plan together: small first (the device starts early), then
    doubling (sorting across more inputs pads less)."""
    start, size = 0, first
    while start < n:
        yield range(start, min(n, start + size))
        start, size = start + size, min(most, size * 2)


_DONE = object()


class PRMScorer:
    """Scores (problem, steps) pairs with a PRM; build once, call `score` / `iter_scores` many times
    (the jitted forward and its compiled shapes are kept)."""

    def __init__(self, prm: nnx.Module, tokenizer, *, step_token: str | int = DEFAULT_STEP_TOKEN,
                 batch_size: int = 32, max_length: int = 4096, buckets: Sequence[int] | None = None,
                 mesh: Mesh | None = None, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                 tokens_per_batch: int | None = None, compute_dtype: str | None = None,
                 group_tokens: int | None = None):
        """`batch_size` rows per forward at most; with `tokens_per_batch`, rows x bucket length at most
        (long buckets get fewer rows, at least one per data shard). `compute_dtype` "bfloat16" runs the
        backbone's matmuls in bf16 (weights cast once), with attention softmax, norms, the score head
        and its softmax in f32; None or "float32" scores in the model's own dtype. `group_tokens`: a
        forward runs its rows in groups of at most this many tokens (0: all at once; None: GROUP_TOKENS
        on one CPU device, else 0)."""
        self.tokenizer = tokenizer
        self.step_token_id = resolve_step_token(tokenizer, step_token)
        self.max_length = max_length
        self.buckets = tuple(sorted(buckets)) if buckets else octave_buckets(max_length)
        if self.buckets[-1] < max_length:
            raise ValueError(f"largest bucket {self.buckets[-1]} is below max_length {max_length}")
        self.mesh = mesh
        self.system_prompt = system_prompt
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # Every data shard needs whole rows: batch sizes are multiples of data*fsdp.
        self.shards = batch_ways(mesh)
        self.batch_size = self._round(batch_size)
        self.tokens_per_batch = tokens_per_batch
        self.rules = BatchRules(self.buckets, self.batch_size, tokens_per_batch, self.shards)
        if compute_dtype not in (None, *SCORING_DTYPES):
            raise InputError(f"compute_dtype={compute_dtype!r}: expected one of {', '.join(SCORING_DTYPES)}")
        model_dtype = str(jnp.dtype(prm.cfg.dtype)) if hasattr(prm, "cfg") else "float32"
        self.compute_dtype = compute_dtype or model_dtype
        self._sumsq: float | None = None
        if self.compute_dtype != model_dtype:
            self._sumsq = _sumsq(nnx.state(prm))  # of the weights as given, before the cast
            graphdef, state, head = _mixed_precision(prm, self.compute_dtype)
            self._head = head if mesh is None else jax.device_put(head, NamedSharding(mesh, P()))
        else:
            graphdef, state = nnx.split(prm)
            self._head = None
        if mesh is not None:  # no-op when the model was already created or loaded sharded
            state = jax.device_put(state, state_shardings(state, mesh))
        self.group_tokens = default_group_tokens(mesh) if group_tokens is None else group_tokens
        self._fwd = _jitted_forward(graphdef, mesh, self._head is not None, self.group_tokens)
        self.state = state
        self.shapes_used: set[tuple[int, int]] = set()  # (rows, length) of the forwards run
        self.last_stats = ScoringStats()  # of the latest score / iter_scores call

    def _round(self, rows: int) -> int:
        return max(1, -(-rows // self.shards)) * self.shards

    def rows_for(self, length: int) -> int:
        """Rows per batch at most for the bucket `length`."""
        return self.rules.rows_for(length)

    def fingerprint(self) -> dict:
        """What the scores depend on: encoding settings, the compute dtype and a checksum of the weights
        (sum of squares, compared with a relative tolerance since reduction order varies with the mesh)."""
        if self._sumsq is None:
            self._sumsq = _sumsq(self.state)
        return {"max_length": self.max_length, "step_token_id": self.step_token_id,
                "system_prompt": self.system_prompt, "compute_dtype": self.compute_dtype,
                "param_sumsq": self._sumsq}

    def encode(self, problem: str, steps: Sequence[str]) -> Encoded:
        return encode_item(self.tokenizer, problem, steps, self.step_token_id, self.max_length, self.system_prompt)

    def _forward(self, ids: np.ndarray, mask: np.ndarray, slots: np.ndarray | None):
        """P(correct) [rows, K] at slots [rows, K] (step positions), or [rows, T] at every position
        when slots is None."""
        batch = shard_batch((ids, mask, slots), self.mesh)
        if self._head is None:
            return self._fwd(self.state, *batch)
        return self._fwd(self.state, self._head, *batch)

    def _produce(self, items: Sequence[Item], out: queue.Queue, stop: threading.Event, stats: ScoringStats) -> None:
        """Background thread: encode items a chunk at a time, plan each chunk's batches and build their
        arrays, so the caller's thread only dispatches forwards and reads results."""
        def put(x) -> bool:
            while not stop.is_set():
                try:
                    out.put(x, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            for chunk in _chunks(len(items)):
                t = time.perf_counter()
                encoded, empty = {}, []
                for i in chunk:
                    enc = self.encode(*items[i])
                    stats.truncated += enc.truncated
                    if enc.step_positions:
                        encoded[i] = enc
                    else:  # no step token left after truncation (or no steps): nothing to read out
                        empty.append(i)
                index = list(encoded)
                # Only the part up to the last surviving step token influences a score; drop the rest.
                lengths = [encoded[i].step_positions[-1] + 1 for i in index]
                # An input with more steps than its bucket's step slots runs the last layer at every position,
                # in batches of such inputs alone: its scores, and its batch-mates', never depend on the batch.
                dense = [len(encoded[i].step_positions) > step_slots(pick_bucket(n, self.buckets))
                         for i, n in zip(index, lengths)]
                plan = []
                for kind in (False, True):
                    part = [j for j, d in enumerate(dense) if d == kind]
                    plan += [dataclasses.replace(b, items=tuple(part[k] for k in b.items))
                             for b in plan_batches([lengths[j] for j in part], self.rules)]
                stats.host_s += time.perf_counter() - t
                if empty and not put(("empty", empty)):
                    return
                for b in plan:
                    t = time.perf_counter()
                    ids = np.full((b.rows, b.length), self.pad_id, np.int32)
                    mask = np.zeros((b.rows, b.length), np.int32)
                    mask[:, 0] = 1  # filler rows attend to one token, so no row is fully masked
                    steps = [encoded[index[j]].step_positions for j in b.items]
                    slots = None if dense[b.items[0]] else np.zeros((b.rows, step_slots(b.length)), np.int32)
                    rows = []  # (item, where its step scores are in the forward's output row)
                    for r, (j, positions) in enumerate(zip(b.items, steps)):
                        n = lengths[j]
                        ids[r, :n] = encoded[index[j]].ids[:n]
                        mask[r, :n] = 1
                        if slots is None:
                            rows.append((index[j], list(positions)))
                        else:  # unused slots repeat the last step
                            slots[r] = positions[-1]
                            slots[r, :len(positions)] = positions
                            rows.append((index[j], list(range(len(positions)))))
                    stats.real_tokens += sum(lengths[j] for j in b.items)
                    stats.positions += b.positions
                    stats.host_s += time.perf_counter() - t
                    if not put(("batch", rows, ids, mask, slots)):
                        return
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 -- raised again in the caller's thread
            put(e)

    def iter_scores(self, items: Sequence[Item], progress: Callable[[int], None] | None = None
                    ) -> Iterator[tuple[int, list[float]]]:
        """Yield (index into items, step scores) as batches finish (longest first within each chunk of
        inputs). `progress(n)` is called with the number of items finished since the last call.
        `self.last_stats` describes the call (padding share, timings) once it is exhausted."""
        stats = self.last_stats = ScoringStats(items=len(items))
        start = time.perf_counter()
        feed: queue.Queue = queue.Queue(maxsize=4)  # batches built ahead of the device
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(items, feed, stop, stats), daemon=True,
                                    name="prm-scoring-host")
        producer.start()

        def read(pending):  # device -> host for a dispatched batch
            rows, probs = pending
            t = time.perf_counter()
            probs = np.asarray(jax.device_get(probs))
            stats.wait_s += time.perf_counter() - t
            return [(i, probs[r, positions].astype(float).tolist()) for r, (i, positions) in enumerate(rows)]

        pending = None
        try:
            while (msg := feed.get()) is not _DONE:
                if isinstance(msg, BaseException):
                    raise msg
                if msg[0] == "empty":
                    yield from self._finish([(i, []) for i in msg[1]], progress)
                    continue
                _, rows, ids, mask, slots = msg
                if ids.shape not in self.shapes_used:
                    self.shapes_used.add(ids.shape)
                    stats.new_shapes += 1
                    log.info("PRM forward shape: batch %d x length %d", *ids.shape)
                # Dispatch this batch before reading the previous one, so reading out rewards and the
                # caller's writing overlap the device's work (JAX dispatches asynchronously).
                dispatched = (rows, self._forward(ids, mask, slots))
                stats.batches += 1
                stats.scored += len(rows)
                if pending is not None:
                    yield from self._finish(read(pending), progress)
                pending = dispatched
            if pending is not None:
                yield from self._finish(read(pending), progress)
        finally:
            stop.set()
            producer.join()
        stats.wall_s = time.perf_counter() - start
        if stats.truncated:
            log.warning("%d of %d inputs exceed max_length=%d: their later steps get no score (%d get none at all)",
                        stats.truncated, stats.items, self.max_length, stats.items - stats.scored)
        if stats.items:
            log.info("%s", stats.line())

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
                tokens_per_batch: int | None = None, compute_dtype: str | None = None) -> list[list[float]]:
    """Step scores P(correct) for every (problem, steps) pair, in input order; a list shorter than
    the steps means the later steps were truncated away (see the module docstring)."""
    scorer = PRMScorer(prm, tokenizer, step_token=step_token, batch_size=batch_size, max_length=max_length,
                       buckets=buckets, mesh=mesh, system_prompt=system_prompt,
                       tokens_per_batch=tokens_per_batch, compute_dtype=compute_dtype)
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
        # an OUT written before scoring had a compute dtype was scored in f32
        before.setdefault("compute_dtype", "float32")
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
               desc: str, unit: str, show_progress: bool = True) -> dict:
    """Score `todo` (items with .problem and .steps) and write `row_of(item, scores)` as each
    finishes (host 0 writes; every host scores), with a progress bar; closes the writer. Returns the
    run's scoring stats (padding share, tokens, timings) for its summary."""
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
    stats = scorer.last_stats.as_dict()
    if todo and writer is not None:
        print(f"{desc}: {scorer.last_stats.line()}")
    return stats
