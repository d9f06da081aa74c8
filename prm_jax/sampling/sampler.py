"""Batched generation for the Flax causal LM: prefill, then one jitted `lax.while_loop` decode.

Public API
----------
- `generate(model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=0,
  stop_ids=None, mesh=None, return_logprobs=False)` -> new token ids per prompt.
- `generate_from_prefixes(model, prefixes, n, max_new_tokens, ...)` -> n continuations per prefix,
  each prefix prefilled once (and a prefix that is a prefix of another one in the same call is
  not prefilled at all: it reuses the longer one's cache rows); with return_cache=True also the
  rows' final KV caches (`KVRows`), which a later call extends with reuse=... instead of
  prefilling those rows' tokens again (search's candidates, step after step).
- `compile_count()` / `compile_log()`: how many programs the sampler has compiled in this process.
- `last_stats()` / `total_stats()`: decode utilisation and step times (`SamplerStats`).

Output convention: the returned ids are the *new* tokens only (never the prompt, never padding);
a row that produced a stop id ends with that stop id; otherwise it has exactly max_new_tokens ids.
Log-probs (`return_logprobs=True`) are log p(token) under the model's raw distribution
(log_softmax of the logits at temperature 1, before top-k/top-p), one float per returned id.

Randomness: the key of a row is fold_in(fold_in(key(seed), key_id), sample_id) and the key of its
t-th new token is fold_in(row_key, t); key_id defaults to the prompt's index in `prompts`,
sample_id to 0 (in generate_from_prefixes: sample j of prefix i has key_id i, sample_id j).
A row's tokens therefore depend only on (seed, key_id, sample_id, its prompt and the weights):
not on the mesh, the batch it lands in, or its neighbours. generate_from_prefixes(prefixes, n)
equals generate(the prefixes each repeated n times, key_ids=[i]*n..., sample_ids=[0..n-1]...).
This is exact for equal logits; XLA may round a row's logits differently in another batch shape
or mesh (last-bit differences), which changes a sample only when its uniform falls within that
distance of a token boundary: rare, but a long rollout over a flat 32k-token distribution can
hit it (the benchmark sees a few rows in 48 diverge); greedy decoding is affected only by ties.

How it runs (batching="continuous", the default): a pool of slots (max_batch, or fewer when the
call has fewer rows) decodes in chunks of up to CHUNK_STEPS steps; between chunks, finished rows
are collected and pending requests prefilled into the free slots (in source order, one prefill per
distinct source in each admission group, so prefix sharing holds), and once nothing is pending the
pool is halved whenever half of it is idle. The cache length follows the filled part in buckets of
size_bucket(n, 128) positions, so a step attends over what the live rows use, not prompt +
max_new_tokens. When the call's sources have many rows each (MC rollouts: a solution's step prefixes
x n completions), the pool keeps each source's prompt once, in a few shared prefix rows, and the
slots' caches hold only the new tokens: a step reads each prompt once instead of once per row. A
row's key and step keys are the same as in the static path, so both give the same tokens for equal
logits. `last_stats()` / `total_stats()` report the decode utilisation (kept tokens
per computed token slot) and ms per step (`SamplerStats.floor_ms_per_step` compares with a floor).

batching="static" (the former path): prompts are sorted by length and cut into batches of at most
`max_batch` rows, each decoded until its longest row ends.
Batch sizes and prompt lengths are rounded up to buckets (1, 2, 3, 4, 6, 8, 12, 16, 24, ... i.e.
powers of two and 1.5x powers of two; batches also to a multiple of the data-parallel size), as is
max_new_tokens (the true limit is a traced scalar), and a call's last, short batch is padded to its
first one's size, so a long run compiles a handful of programs.
The KV cache has one slot per position (cache slot == position), so right-padded prompts work
without shifting: row b's first new token is written at slot len_b, over its padding. The prefill
program returns the cache and the first logits; the decode program (one `while_loop` that exits
as soon as every row is done) takes the cache donated and updates it in place.
Sharded: pass `mesh` (prm_jax.parallel.mesh.make_mesh); rows are split over ("data", "fsdp"), the
cache's kv heads over "tensor", and the weights follow the mesh rules (a model created with
create_sharded on that mesh is used as it is; any other is placed by its logical axes).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from prm_jax.buckets import batch_bucket, size_bucket
from prm_jax.models.qwen2 import SharedPrefix, cache_dtype
from prm_jax.parallel.mesh import batch_sharding, batch_ways, logical_spec, state_shardings
from prm_jax.sampling.select import Strategy, choose

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 64
_COMPILES: collections.Counter = collections.Counter()
_COMPILE_LOG: list[str] = []


def compile_count() -> int:
    """Number of sampler programs (prefill + decode) traced and compiled so far in this process."""
    return sum(_COMPILES.values())


def compile_log() -> list[str]:
    """One line per compilation: which program and for which shapes."""
    return list(_COMPILE_LOG)


def _note_compile(what: str, detail: str) -> None:
    # Runs only while jax traces the function, i.e. once per new shape/static configuration.
    _COMPILES[what] += 1
    line = f"{what} #{_COMPILES[what]}: {detail}"
    _COMPILE_LOG.append(line)
    log.info("sampler compile %s", line)


# -- programs ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything that selects a compiled program besides array shapes (prefill uses only
    cache_len and mesh, and gets strategy=None, new_len=0, logprobs=False)."""
    cache_len: int
    mesh: Mesh | None
    strategy: Strategy | None = None
    new_len: int = 0
    logprobs: bool = False
    stop_string: bool = False  # rows also stop when their new text completes a stop string


def _cache_sharding(mesh: Mesh | None, shape) -> NamedSharding | None:
    if mesh is None:
        return None
    return NamedSharding(mesh, logical_spec(("batch", "kv_heads", "length", None), shape, mesh))


def _prefix_sharding(mesh: Mesh | None, shape) -> NamedSharding | None:
    """Shared prefix rows: every device's rows may read any of them, so only kv heads are split."""
    if mesh is None:
        return None
    return NamedSharding(mesh, logical_spec((None, "kv_heads", "length", None), shape, mesh))


def _constrain(cache, mesh, sharding=_cache_sharding):
    if mesh is None:
        return cache
    return [tuple(jax.lax.with_sharding_constraint(a, sharding(mesh, a.shape)) for a in kv) for kv in cache]


def _prefill_impl(graphdef, params, ids, row_src, row_len, *, st: _Static):
    """Prefill the U source sequences ids [U, T] once, then hand each of the R rows a copy of its
    source's cache and the logits at its own last prompt position row_len-1 (a row may use a
    shorter prefix of its source: slots past its length are masked and later overwritten)."""
    _note_compile("prefill", f"sources={ids.shape[0]} len={ids.shape[1]} rows={row_src.shape[0]} "
                             f"cache={st.cache_len}")
    model = nnx.merge(graphdef, params)
    u, t = ids.shape
    cache = _constrain(model.init_cache(u, st.cache_len), st.mesh)
    hidden, cache = model.forward_cached(ids, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (u, t)), cache)
    last = hidden[row_src, row_len - 1]  # [R, H]
    logits = model.logits(last)
    cache = _constrain([(k[row_src], v[row_src]) for k, v in cache], st.mesh)
    return cache, logits


_prefill = jax.jit(_prefill_impl, static_argnames=("graphdef", "st"))


def _decode_impl(graphdef, params, cache, logits0, lens, key_ids, sample_ids, done0, base_key, max_new,
                 temperature, top_p, stop_ids, stop_table, *, st: _Static):
    """Decode up to max_new tokens for R rows. Iteration t picks token t from the current logits
    (logits0 from the prefill for t = 0), then feeds it at position lens + t for the next logits.
    stop_table [D, V] (with st.stop_string): stop-string matcher, see stop_string_table.
    Returns tokens [R, new_len] (-1 after a row is done), their log-probs [R, new_len], the cache."""
    _note_compile("decode", f"rows={lens.shape[0]} cache={st.cache_len} new={st.new_len} "
                            f"strategy={st.strategy} logprobs={st.logprobs}")
    model = nnx.merge(graphdef, params)
    r = lens.shape[0]
    row_keys = jax.vmap(lambda a, b: jax.random.fold_in(jax.random.fold_in(base_key, a), b))(key_ids, sample_ids)

    def pick(logits, t, done, matched):
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(row_keys)
        tok = choose(logits, step_keys, temperature, top_p, st.strategy)
        if st.logprobs:
            lp = jnp.take_along_axis(logits, tok[:, None], axis=1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)
        else:
            lp = jnp.zeros((r,), jnp.float32)
        stopped = jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
        if st.stop_string:  # matched = length of the stop string's prefix the new text ends with
            matched = stop_table[matched, tok]
            stopped |= matched >= stop_table.shape[0]
        return jnp.where(done, -1, tok), lp, done | stopped, matched

    def write(buf, col, t):
        return jax.lax.dynamic_update_slice(buf, col[:, None], (0, t))

    def cond(c):
        t, _, _, done, _, _, _ = c
        return (t < max_new) & ~jnp.all(done)

    def body(c):
        t, cache, logits, done, out_tok, out_lp, matched = c
        tok, lp, done, matched = pick(logits, t, done, matched)

        def forward(cache):  # feed token t at position lens + t -> logits of token t + 1
            hidden, cache = model.forward_cached(jnp.maximum(tok, 0)[:, None], (lens + t)[:, None], cache)
            return model.logits(hidden[:, 0]), _constrain(cache, st.mesh)

        # skip the forward pass after the last token
        logits, cache = jax.lax.cond((t + 1 < max_new) & ~jnp.all(done), forward, lambda c: (logits, c), cache)
        return t + 1, cache, logits, done, write(out_tok, tok, t), write(out_lp, lp, t), matched

    out_tok = jnp.full((r, st.new_len), -1, jnp.int32)
    out_lp = jnp.zeros((r, st.new_len), jnp.float32)
    init = (jnp.int32(0), cache, logits0, done0, out_tok, out_lp, jnp.zeros((r,), jnp.int32))
    _, cache, _, _, out_tok, out_lp, _ = jax.lax.while_loop(cond, body, init)
    # The cache is returned (and dropped by the caller) so that XLA can alias it to the donated
    # input and update it in place instead of copying it into the loop.
    return out_tok, out_lp, cache


_decode = jax.jit(_decode_impl, static_argnames=("graphdef", "st"), donate_argnames=("cache",))


# -- continuous batching: programs -----------------------------------------------------------------
# A pool of S slots, each a cache row [K, L, D] plus its decode state: the next-token logits, the
# prompt length, t (tokens emitted so far), done, its key/sample ids, the stop-string match and
# its output so far. `_admit` prefills requests into free slots, `_chunk` decodes up to a
# given number of steps (leaving early once enough slots are free), `_resize` gathers slots into
# a smaller pool and crops or extends the cache length L (attention reads all L positions, so L
# follows the filled part of the cache in buckets instead of the prompt + max_new_tokens maximum).
# A pool whose rows share few sources keeps their prompts once, in U shared prefix rows (`prefix`:
# the sources' caches [U, K, T, D] and final hidden states [U, T, H]; a slot's `src` names its row),
# and the slots' own caches then hold only the new tokens (position p at slot p - prompt length):
# `_admit_shared` admits into such a pool.

_STATE_KEYS = ("logits", "lens", "t", "done", "key_ids", "sample_ids", "matched", "out_tok", "out_lp", "src")


def _admit_impl(graphdef, params, cache, state, ids, row_src, row_len, slots, key_ids, sample_ids, *, st: _Static):
    """Prefill the sources ids [U, T] and hand row i (of source row_src[i], prompt length
    row_len[i]) to slot slots[i]: its cache positions [0, T) and fresh state. slots[i] = S (out of
    range) marks a padding row, whose writes are dropped."""
    _note_compile("admit", f"sources={ids.shape[0]} len={ids.shape[1]} rows={row_src.shape[0]} "
                           f"slots={state['lens'].shape[0]} cache={cache[0][0].shape[2]}")
    model = nnx.merge(graphdef, params)
    hidden, src = _prefill_sources(model, ids, st.mesh)
    logits = model.logits(hidden[row_src, row_len - 1])
    return _place(cache, state, src, ids.shape[1], logits, row_src, row_len, slots, key_ids, sample_ids, st.mesh)


def _prefill_sources(model, ids, mesh):
    """The final hidden states [U, T, H] and KV caches of the sources ids [U, T], from position 0."""
    u, t = ids.shape
    cache = _constrain(model.init_cache(u, t), mesh)
    return model.forward_cached(ids, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (u, t)), cache)


def _place(cache, state, src, t, logits, row_src, row_len, slots, key_ids, sample_ids, mesh):
    """Slot slots[i] gets source row_src[i]'s cache positions [0, t) and a fresh state."""
    cache = [(ck.at[slots, :, :t].set(k[row_src, :, :t], mode="drop"),
              cv.at[slots, :, :t].set(v[row_src, :, :t], mode="drop")) for (ck, cv), (k, v) in zip(cache, src)]
    return _constrain(cache, mesh), _fresh(state, slots, logits, row_len, key_ids, sample_ids)


def _fresh(state, slots, logits, row_len, key_ids, sample_ids, **more):
    """The state with slots[i] (out of range: dropped) starting row i: its first logits, prompt
    length and random-stream ids, nothing emitted yet (and `more`'s entries, e.g. its prefix row)."""
    fresh = dict(logits=logits, lens=row_len, t=jnp.zeros_like(row_len), done=jnp.zeros(row_len.shape, bool),
                 key_ids=key_ids, sample_ids=sample_ids, matched=jnp.zeros_like(row_len), **more)
    return {name: (a.at[slots].set(fresh[name], mode="drop") if name in fresh else a) for name, a in state.items()}


_admit = jax.jit(_admit_impl, static_argnames=("graphdef", "st"), donate_argnames=("cache", "state"))


def _admit_shared_impl(graphdef, params, state, prefix, ids, prefix_rows, row_src, row_len, slots, key_ids,
                       sample_ids, *, st: _Static):
    """Prefill the new sources ids [U, T] into shared prefix rows prefix_rows[u] (out of range:
    padding, dropped), then hand row i (prompt length row_len[i], its source in prefix row
    row_src[i], new or not) to slot slots[i]: a fresh state whose logits are read off the prefix
    row's hidden states. Its own cache is left as it is: it will hold positions from row_len[i] on,
    and a step attends only to the slots it has written."""
    _note_compile("admit_shared", f"sources={ids.shape[0]} len={ids.shape[1]} rows={row_src.shape[0]} "
                                  f"slots={state['lens'].shape[0]} prefix_rows={prefix['hidden'].shape[0]}")
    model = nnx.merge(graphdef, params)
    hidden, src = _prefill_sources(model, ids, st.mesh)
    cache = _constrain([(pk.at[prefix_rows].set(k, mode="drop"), pv.at[prefix_rows].set(v, mode="drop"))
                        for (pk, pv), (k, v) in zip(prefix["cache"], src)], st.mesh, _prefix_sharding)
    hidden = prefix["hidden"].at[prefix_rows].set(hidden.astype(prefix["hidden"].dtype), mode="drop")
    logits = model.logits(hidden[row_src, row_len - 1])
    return _fresh(state, slots, logits, row_len, key_ids, sample_ids, src=row_src), dict(cache=cache, hidden=hidden)


_admit_shared = jax.jit(_admit_shared_impl, static_argnames=("graphdef", "st"), donate_argnames=("state", "prefix"))


def _admit_cached_impl(graphdef, params, cache, state, kept, ids, starts, kept_rows, row_src, row_len, slots,
                       key_ids, sample_ids, *, st: _Static):
    """_admit for sources whose first starts[u] positions are in rows kept_rows[u] of a KVRows cache
    `kept`: only their suffixes ids [U, T'] (source[starts[u]:], right-padded) are prefilled, at
    positions starts[u].., over a copy of the kept row. st.cache_len = T, the call's prompt bucket:
    the slots get positions [0, T) as in _admit. (A source with starts[u] = 0 is prefilled whole;
    the kept row copied under it is masked, then overwritten.)"""
    t_len, (u, t) = st.cache_len, ids.shape
    _note_compile("admit_cached", f"sources={u} suffix={t} len={t_len} rows={row_src.shape[0]} "
                                  f"slots={state['lens'].shape[0]} cache={cache[0][0].shape[2]} "
                                  f"kept={kept[0][0].shape[0]}x{kept[0][0].shape[2]}")
    model = nnx.merge(graphdef, params)
    width = t_len + t  # room for every suffix: starts[u] < t_len (dynamic_update_slice would clamp)

    def prefix(a):
        a = a[kept_rows][:, :, :width]
        return jnp.pad(a, ((0, 0), (0, 0), (0, width - a.shape[2]), (0, 0))) if a.shape[2] < width else a
    src = _constrain([(prefix(k), prefix(v)) for k, v in kept], st.mesh)
    hidden, src = model.forward_cached(ids, starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :], src)
    logits = model.logits(hidden[row_src, row_len - 1 - starts[row_src]])
    return _place(cache, state, src, t_len, logits, row_src, row_len, slots, key_ids, sample_ids, st.mesh)


_admit_cached = jax.jit(_admit_cached_impl, static_argnames=("graphdef", "st"), donate_argnames=("cache", "state"))


def _keep_impl(out, cache, slots, rows, *, mesh: Mesh | None):
    """Copy pool slots `slots` (cache positions [0, L)) into rows `rows` of a call's KVRows buffer
    `out` (length >= L: see _grow); rows[i] out of range drops the copy (padding)."""
    _note_compile("keep", f"slots={cache[0][0].shape[0]} cache={cache[0][0].shape[2]} "
                          f"rows={out[0][0].shape[0]}x{out[0][0].shape[2]}")
    length = cache[0][0].shape[2]
    return _constrain([(ok.at[rows, :, :length].set(ck[slots], mode="drop"),
                        ov.at[rows, :, :length].set(cv[slots], mode="drop")) for (ok, ov), (ck, cv) in zip(out, cache)],
                      mesh)


_keep = jax.jit(_keep_impl, static_argnames=("mesh",), donate_argnames=("out",))


def _grow_impl(out, *, length: int, mesh: Mesh | None):
    """The KVRows buffer zero-extended to `length` positions: it follows the longest pool it copies
    from, not prompt + max_new_tokens (a search's steps are far shorter than its token limit)."""
    _note_compile("grow", f"rows={out[0][0].shape[0]} cache={out[0][0].shape[2]}->{length}")
    pad = ((0, 0), (0, 0), (0, length - out[0][0].shape[2]), (0, 0))
    return _constrain([(jnp.pad(k, pad), jnp.pad(v, pad)) for k, v in out], mesh)


_grow = jax.jit(_grow_impl, static_argnames=("length", "mesh"))  # a new shape: nothing to donate to


def _chunk_impl(graphdef, params, cache, state, prefix, base_key, max_new, temperature, top_p, stop_ids, stop_table,
                max_steps, free_target, *, st: _Static):
    """Up to max_steps decode steps of every slot, stopping early once free_target slots are done
    (or all are). Each step picks token t of each live slot from its logits (key fold_in(row key,
    t), exactly as the static decode) and feeds it at position lens + t (with shared prefix rows
    `prefix`, a cache like the pool's or None: at slot t of the slot's own cache). Returns the
    cache, the state and the number of steps run."""
    s_n, length = state["lens"].shape[0], cache[0][0].shape[2]
    _note_compile("decode_chunk", f"slots={s_n} cache={length} new={st.new_len} strategy={st.strategy} "
                                  f"logprobs={st.logprobs}")
    model = nnx.merge(graphdef, params)
    row_keys = jax.vmap(lambda a, b: jax.random.fold_in(jax.random.fold_in(base_key, a), b))(
        state["key_ids"], state["sample_ids"])
    slot = jnp.arange(s_n)

    def cond(c):
        i, _, s = c
        return (i < max_steps) & (jnp.sum(s["done"]) < free_target) & ~jnp.all(s["done"])

    def body(c):
        i, cache, s = c
        t, live = s["t"], ~s["done"]
        tok = choose(s["logits"], jax.vmap(jax.random.fold_in)(row_keys, t), temperature, top_p, st.strategy)
        if st.logprobs:
            lp = jnp.take_along_axis(s["logits"], tok[:, None], axis=1)[:, 0] - jax.nn.logsumexp(s["logits"], axis=-1)
        else:
            lp = jnp.zeros((s_n,), jnp.float32)
        stopped = jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
        matched = s["matched"]
        if st.stop_string:
            matched = stop_table[matched, tok]
            stopped |= matched >= stop_table.shape[0]
        col = jnp.where(live, t, st.new_len)  # a free slot's write is dropped
        t_next = t + live
        done = s["done"] | (live & (stopped | (t_next >= max_new)))
        own = 0 if prefix is None else s["lens"]  # positions held by the prefix rows
        pos = jnp.minimum(s["lens"] + t, own + length - 1)  # only done slots can reach past slot L - 1
        shared = None if prefix is None else SharedPrefix(prefix, s["src"], s["lens"])

        def forward(cache):
            hidden, cache = model.forward_cached(tok[:, None], pos[:, None], cache, shared)
            return model.logits(hidden[:, 0]), _constrain(cache, st.mesh)

        # forward as the true branch: with the pass-through first, XLA:CPU copied the cache every step
        logits, cache = jax.lax.cond(~jnp.all(done), forward, lambda c: (s["logits"], c), cache)
        s = dict(s, logits=logits, t=t_next, done=done, matched=matched,
                 out_tok=s["out_tok"].at[slot, col].set(tok, mode="drop"),
                 out_lp=s["out_lp"].at[slot, col].set(lp, mode="drop"))
        return i + 1, cache, s

    steps, cache, state = jax.lax.while_loop(cond, body, (jnp.int32(0), cache, state))
    return cache, state, steps


_chunk = jax.jit(_chunk_impl, static_argnames=("graphdef", "st"), donate_argnames=("cache", "state"))


def _resize_impl(cache, state, idx, *, length: int, mesh: Mesh | None):
    """The pool of slots idx (in that order), its cache cropped or zero-extended to `length`."""
    _note_compile("resize", f"slots={state['lens'].shape[0]}->{idx.shape[0]} "
                            f"cache={cache[0][0].shape[2]}->{length}")

    def fix(a):
        a = a[idx]
        extra = length - a.shape[2]
        return a[:, :, :length] if extra <= 0 else jnp.pad(a, ((0, 0), (0, 0), (0, extra), (0, 0)))
    return _constrain([(fix(k), fix(v)) for k, v in cache], mesh), {n: a[idx] for n, a in state.items()}


_resize = jax.jit(_resize_impl, static_argnames=("length", "mesh"))  # new shapes: nothing to donate to


# -- host side -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Row:
    out: int  # index into the flat result list
    source: int  # index into the sources list
    length: int  # prompt length (<= the source's length)
    key_id: int
    sample_id: int


@dataclasses.dataclass(frozen=True, eq=False)
class KVRows:
    """The KV caches that a call's rows ended with (generate_from_prefixes(return_cache=True)), so
    that a later call can extend those rows (reuse=...) without prefilling them again: a search
    keeps its candidates' caches from one step to the next. Row i is the call's flat output row i
    (sample j of prefix p is row counts[0] + ... + counts[p-1] + j); tokens[i] = its prefix + its
    new ids; valid[i] = how many leading positions of it the cache holds exactly: all but the last
    new token's (a finished row's last token is fed only while another row of its pool is live).
    cache: per layer (k, v) [rows (bucketed), kv_heads, L, head_dim] on the devices, L the longest
    cache length the call's pool had when a row finished (>= every valid[i])."""
    cache: list
    tokens: tuple[tuple[int, ...], ...]
    valid: tuple[int, ...]
    _index: dict = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        index: dict = {}
        for i, seq in enumerate(self.tokens):
            index.setdefault(seq, i)
        object.__setattr__(self, "_index", index)

    def reusable(self, seq: Sequence[int]) -> tuple[int, int]:
        """(row, k): a row whose tokens are exactly `seq` and the k leading positions of seq whose
        KV it holds (at most len(seq) - 1: the last token is fed again for its logits); k = 0
        (row 0) when no row has these tokens."""
        row = self._index.get(tuple(seq))
        return (0, 0) if row is None else (row, min(self.valid[row], len(seq) - 1))


def _check_tokens(seqs: Sequence[Sequence[int]], what: str, vocab: int) -> list[list[int]]:
    if isinstance(seqs, (str, bytes)) or not isinstance(seqs, Sequence):
        raise TypeError(f"{what}: expected a list of token-id lists, got {type(seqs).__name__}")
    out = []
    for i, s in enumerate(seqs):
        try:
            ids = [int(x) for x in s]
        except (TypeError, ValueError):
            raise TypeError(f"{what}[{i}]: expected a list of ints, got {s!r:.80}") from None
        if not ids:
            raise ValueError(f"{what}[{i}]: empty; every prompt needs at least one token")
        bad = [x for x in ids if not 0 <= x < vocab]
        if bad:
            raise ValueError(f"{what}[{i}]: token id {bad[0]} outside the vocabulary [0, {vocab})")
        out.append(ids)
    return out


def _check_ids(ids: Sequence[int] | None, n: int, what: str, default: Sequence[int]) -> list[int]:
    if ids is None:
        return list(default)
    ids = [int(x) for x in ids]
    if len(ids) != n:
        raise ValueError(f"{what}: {len(ids)} values for {n} prompts")
    bad = [x for x in ids if not 0 <= x < 2 ** 31]
    if bad:
        raise ValueError(f"{what}: {bad[0]} is outside [0, 2^31) (ids are folded into the PRNG key as int32)")
    return ids


def _strategy(temperature: float, top_p: float, top_k: int, vocab: int) -> Strategy:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if temperature == 0:
        return Strategy(greedy=True)
    return Strategy(greedy=False, top_k=min(int(top_k), vocab), use_top_p=top_p < 1)


@dataclasses.dataclass(frozen=True)
class _Call:
    """What every batch of one sampler call shares: validated arguments placed on the devices."""
    graphdef: Any
    params: Any
    mesh: Mesh | None
    dp: int  # rows are split over this many devices: batch sizes are multiples of it
    new_len: int  # bucket of max_new_tokens (the true limit is the traced scalars[0])
    strategy: Strategy
    logprobs: bool
    stop_string: bool
    scalars: list  # max_new_tokens, temperature, top_p (traced)
    stop_dev: Any
    table_dev: Any
    base_key: Any
    put: Any  # host array -> rows split over the mesh
    rep: Any  # host array -> replicated


def _setup(model, max_new_tokens: int, strategy: Strategy, temperature: float, top_p: float, seed: int, stop_ids,
           mesh, return_logprobs: bool, max_batch: int, stop_table: np.ndarray | None) -> _Call:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    vocab = model.cfg.vocab_size
    stops = sorted({int(s) for s in (stop_ids or ())})
    if any(not 0 <= s < vocab for s in stops):
        raise ValueError(f"stop_ids must lie in [0, {vocab}), got {stops}")
    stop_arr = np.full((size_bucket(len(stops), 8),), -1, np.int32)
    stop_arr[:len(stops)] = stops
    if stop_table is not None and (stop_table.ndim != 2 or stop_table.shape[1] != vocab):
        raise ValueError(f"stop_table must be [len(stop string), vocab={vocab}], got {stop_table.shape}")
    graphdef, params = nnx.split(model)
    if mesh is not None:  # a no-op when the model was created sharded on this mesh
        params = jax.device_put(params, state_shardings(params, mesh))
    put = (lambda a: jax.device_put(a, batch_sharding(mesh, a.ndim))) if mesh is not None else jnp.asarray
    rep = (lambda a: jax.device_put(a, NamedSharding(mesh, jax.sharding.PartitionSpec()))) if mesh else jnp.asarray
    scalars = [rep(np.asarray(x, dt)) for x, dt in
               ((max_new_tokens, np.int32), (max(temperature, 1e-6), np.float32), (top_p, np.float32))]
    table = np.zeros((1, 1), np.int32) if stop_table is None else np.asarray(stop_table, np.int32)
    return _Call(graphdef, params, mesh, batch_ways(mesh),
                 size_bucket(max_new_tokens, 8), strategy, return_logprobs, stop_table is not None, scalars,
                 rep(stop_arr), rep(table), rep(jax.random.key(seed)), put, rep)


def _run(model, sources: list[list[int]], rows: list[_Row], max_new_tokens: int, strategy: Strategy,
         temperature: float, top_p: float, seed: int, stop_ids, mesh, return_logprobs: bool,
         max_batch: int, stop_table: np.ndarray | None = None, batching: str = "continuous",
         reuse: KVRows | None = None, keep: bool = False,
         ) -> tuple[list[list[int]], list[list[float]], KVRows | None]:
    """Sample every row: continuous batching (slots refilled as rows finish) or static batches.
    reuse: kept caches to prefill sources from; keep: also return the rows' caches (KVRows)."""
    if batching not in ("continuous", "static"):
        raise ValueError(f"batching must be 'continuous' or 'static', got {batching!r}")
    if batching == "static" and (reuse is not None or keep):
        raise ValueError("reuse / return_cache need batching='continuous'")
    call = _setup(model, max_new_tokens, strategy, temperature, top_p, seed, stop_ids, mesh, return_logprobs,
                  max_batch, stop_table)
    order = sorted(rows, key=lambda rw: (-len(sources[rw.source]), rw.source, rw.out))
    results: list[Any] = [None] * len(rows)
    if batching == "static":
        stats, kept = _run_static(model.cfg, call, sources, order, max_new_tokens, max_batch, results), None
    else:
        stats, kept = _run_continuous(model.cfg, call, sources, order, max_new_tokens, max_batch, results,
                                      _reused_prefixes(sources, order, reuse), keep)
    global _LAST
    _LAST = stats
    _TOTAL[0] = _TOTAL[0] + stats
    if kept is not None:
        kept = KVRows(kept, tuple(tuple(sources[rw.source][:rw.length]) + tuple(results[rw.out][0]) for rw in rows),
                      tuple(rw.length + len(results[rw.out][0]) - 1 for rw in rows))
    return [x[0] for x in results], [x[1] for x in results], kept


def _reused_prefixes(sources, order: list[_Row], reuse: KVRows | None):
    """(reuse, kept row per source, reused length per source), or None when no source has a kept
    row. A source's reused length stays below each of its rows' prompt lengths (a row may read a
    shorter prefix of its source), so every row's last prompt token is prefilled for its logits."""
    if reuse is None:
        return None
    shortest = {}
    for rw in order:
        shortest[rw.source] = min(shortest.get(rw.source, rw.length), rw.length)
    rows, starts = np.zeros(len(sources), np.int32), np.zeros(len(sources), np.int32)
    for s in shortest:
        row, k = reuse.reusable(sources[s])
        rows[s], starts[s] = row, min(k, shortest[s] - 1)
    return (reuse, rows, starts) if starts.any() else None


def _run_static(cfg, call: _Call, sources, order: list[_Row], max_new_tokens: int, max_batch: int,
                results: list) -> "SamplerStats":
    """Batches of <= max_batch rows (grouped by source, longest first), each decoded until its
    longest row ends, in a cache preallocated for prompt + max_new_tokens."""
    put, new_len, dp = call.put, call.new_len, call.dp
    chunks = [order[start:start + max_batch] for start in range(0, len(order), max_batch)]
    # Every batch of a call gets the first one's row count and the most sources any batch has, so
    # a call's short last batch reuses its programs: a compile costs more than padded rows.
    r = batch_bucket(len(chunks[0]), dp) if chunks else 0
    u = max((batch_bucket(len({rw.source for rw in c}), dp) for c in chunks), default=0)
    stats = SamplerStats(calls=1)
    for chunk in chunks:
        src_ids = list(dict.fromkeys(rw.source for rw in chunk))
        src_pos = {s: i for i, s in enumerate(src_ids)}
        t = size_bucket(max(len(sources[s]) for s in src_ids), 16)
        ids = np.zeros((u, t), np.int32)
        for i, s in enumerate(src_ids):
            ids[i, :len(sources[s])] = sources[s]
        row_src = np.zeros((r,), np.int32)
        lens = np.ones((r,), np.int32)
        key_ids = np.zeros((r,), np.int32)
        sample_ids = np.zeros((r,), np.int32)
        done = np.ones((r,), bool)  # bucket padding rows start done
        for i, rw in enumerate(chunk):
            row_src[i], lens[i], key_ids[i], sample_ids[i], done[i] = (
                src_pos[rw.source], rw.length, rw.key_id, rw.sample_id, False)
        st = _Static(cache_len=t + new_len, mesh=call.mesh)
        stats = stats + SamplerStats(prefill_tokens=sum(len(sources[s]) for s in src_ids))
        cache, logits0 = _prefill(call.graphdef, call.params, put(ids), put(row_src), put(lens), st=st)
        st = dataclasses.replace(st, strategy=call.strategy, new_len=new_len, logprobs=call.logprobs,
                                 stop_string=call.stop_string)
        jax.block_until_ready(logits0)
        t0 = time.perf_counter()
        toks, lps, _ = _decode(call.graphdef, call.params, cache, logits0, put(lens), put(key_ids),
                               put(sample_ids), put(done), call.base_key, *call.scalars, call.stop_dev,
                               call.table_dev, st=st)
        toks, lps = np.asarray(jax.device_get(toks)), np.asarray(jax.device_get(lps))
        seconds = time.perf_counter() - t0
        kept = 0
        for i, rw in enumerate(chunk):
            row = toks[i, :max_new_tokens]
            n = int(np.argmax(row < 0)) if (row < 0).any() else len(row)
            results[rw.out] = (row[:n].tolist(), lps[i, :n].tolist())
            kept += n
        steps = max(len(results[rw.out][0]) for rw in chunk)  # the loop ran until its longest row ended
        stats = stats + _step_stats(cfg, r, t + new_len, steps, kept, seconds)
    return stats


CHUNK_STEPS = 32  # most decode steps between two visits of the continuous scheduler
# Most shared prefix rows a pool keeps: every row's step computes its scores against all of them. The demo's
# rollouts (about 18 rows a source, 5 prefix rows in a 64-slot pool) ran 31.6-38.2 s with up to 8 against
# 17.8 s without; the MC workload of bench_sampler (1 source) gains 24-37% (notes/2026-12-06-shared-prefix-rows.md).
MAX_PREFIX_ROWS = 2
MIN_SLOTS = 4  # the pool is halved as it drains (no requests pending), down to this many slots
_CACHE_QUANTUM = 128  # cache lengths are size_bucket(n, 128): 128, 192, 256, 384, 512, 768, ...


def _run_continuous(cfg, call: _Call, sources, order: list[_Row], max_new_tokens: int, max_batch: int,
                    results: list, reused=None, keep: bool = False) -> tuple["SamplerStats", list | None]:
    """A pool of S = size_bucket(min(max_batch, rows)) slots. Requests are admitted in source order
    (one prefill per distinct source in an admission group); the pool decodes in chunks of up to
    CHUNK_STEPS steps, and between chunks finished rows are collected, free slots refilled (once a
    quarter of the pool is free), the pool halved once no request is pending and half of it is
    idle, and the cache length moved to the bucket of what the live rows will fill next.
    When sources have many rows each (`_prefix_rows`), their prompts are kept once, in shared
    prefix rows, and the slots' caches hold only the new tokens; a row then waits for a prefix row
    if every one is held by another source's live rows.
    reused (from _reused_prefixes): prefill only each source's positions past its kept prefix.
    keep: copy each row's cache into a buffer as it finishes, returned (else None) for KVRows."""
    put, rep, new_len, dp = call.put, call.rep, call.new_len, call.dp
    s_n = batch_bucket(min(max_batch, len(order)), dp)
    refill = min(s_n, batch_bucket(max(1, s_n // 4), dp))
    n_src = len({rw.source for rw in order})
    u_full, u_refill = batch_bucket(min(s_n, n_src), dp), batch_bucket(min(refill, n_src), dp)
    t_len = size_bucket(max(len(sources[rw.source]) for rw in order), 16)  # prompt bucket of the call
    n_prefix = 0 if reused is not None or keep else _prefix_rows(len(order), n_src, s_n)
    cap = (0 if n_prefix else t_len) + new_len  # the static path's cache length: no row ever needs more
    mesh, vocab = call.mesh, cfg.vocab_size
    st = _Static(cache_len=0, mesh=mesh, strategy=call.strategy, new_len=new_len, logprobs=call.logprobs,
                 stop_string=call.stop_string)

    def length_for(pos: int) -> int:  # cache length for live rows whose next position is < pos
        return min(cap, size_bucket(pos + CHUNK_STEPS, _CACHE_QUANTUM))

    def empty_cache(n: int, length: int):
        shape = (n, cfg.num_kv_heads, length, cfg.head_size)
        sh = _cache_sharding(mesh, shape)
        return [tuple(jnp.zeros(shape, cache_dtype(cfg), device=sh) for _ in "kv") for _ in range(cfg.num_layers)]

    def empty_pool(n: int, length: int):
        host = dict(logits=np.zeros((n, vocab), np.float32), lens=np.ones(n, np.int32), t=np.zeros(n, np.int32),
                    done=np.ones(n, bool), key_ids=np.zeros(n, np.int32), sample_ids=np.zeros(n, np.int32),
                    matched=np.zeros(n, np.int32), out_tok=np.full((n, new_len), -1, np.int32),
                    out_lp=np.zeros((n, new_len), np.float32), src=np.zeros(n, np.int32))
        return empty_cache(n, length), {k: put(host[k]) for k in _STATE_KEYS}

    length = length_for(0 if n_prefix else t_len)
    cache, state = empty_pool(s_n, length)
    slot_row: list[_Row | None] = [None] * s_n
    lens_h, t_h = np.zeros(s_n, np.int64), np.zeros(s_n, np.int64)
    if n_prefix:
        shape = (n_prefix, cfg.num_kv_heads, t_len, cfg.head_size)
        prefix = dict(cache=[tuple(jnp.zeros(shape, cache_dtype(cfg), device=_prefix_sharding(mesh, shape))
                                   for _ in "kv") for _ in range(cfg.num_layers)],
                      hidden=call.rep(np.zeros((n_prefix, t_len, cfg.hidden_size), jnp.dtype(cfg.dtype))))
        resident: dict[int, int] = {}  # source -> the prefix row holding it
        users = np.zeros(n_prefix, np.int64)  # live slots reading each prefix row
    pending = collections.deque(order)
    stats = SamplerStats(calls=1)
    kept = empty_cache(batch_bucket(len(order), dp), length) if keep else None
    if reused is not None:  # prefill width: the longest part of a source past its kept prefix
        suffix = size_bucket(max(len(sources[rw.source]) - int(reused[2][rw.source]) for rw in order))

    def seat(group: list[_Row], slots: list[int], r: int, source_index: dict[int, int]):
        """Seat the group's rows in `slots` (host side) and return the admission's per-row arrays
        (r rows; padding rows go to slot S, out of range): source index, prompt length, slot, key ids."""
        row_src, row_len = np.zeros(r, np.int32), np.ones(r, np.int32)
        slot_idx, key_ids, sample_ids = np.full(r, len(slot_row), np.int32), np.zeros(r, np.int32), np.zeros(r, np.int32)
        for i, (rw, sl) in enumerate(zip(group, slots)):
            row_src[i], row_len[i], slot_idx[i], key_ids[i], sample_ids[i] = (
                source_index[rw.source], rw.length, sl, rw.key_id, rw.sample_id)
            slot_row[sl], lens_h[sl], t_h[sl] = rw, rw.length, 0
        return row_src, row_len, slot_idx, key_ids, sample_ids

    def admit(group: list[_Row], slots: list[int], r: int, u: int):
        nonlocal cache, state, stats
        src_ids = list(dict.fromkeys(rw.source for rw in group))
        src_pos = {s: i for i, s in enumerate(src_ids)}
        starts = np.zeros(u, np.int32) if reused is None else reused[2][src_ids + [0] * (u - len(src_ids))]
        starts[len(src_ids):] = 0
        ids = np.zeros((u, t_len if reused is None else suffix), np.int32)
        for i, s in enumerate(src_ids):
            ids[i, :len(sources[s]) - starts[i]] = sources[s][starts[i]:]
        stats = stats + SamplerStats(prefill_tokens=sum(len(sources[s]) for s in src_ids) - int(starts.sum()))
        row_src, row_len, slot_idx, key_ids, sample_ids = seat(group, slots, r, src_pos)
        if reused is None:
            cache, state = _admit(call.graphdef, call.params, cache, state, put(ids), rep(row_src), rep(row_len),
                                  rep(slot_idx), rep(key_ids), rep(sample_ids), st=st)
        else:
            rows = reused[1][src_ids + [0] * (u - len(src_ids))]
            cache, state = _admit_cached(call.graphdef, call.params, cache, state, reused[0].cache, put(ids),
                                         put(starts), put(rows), rep(row_src), rep(row_len), rep(slot_idx),
                                         rep(key_ids), rep(sample_ids), st=dataclasses.replace(st, cache_len=t_len))

    def take(n: int) -> tuple[list[_Row], dict[int, int]]:
        """Up to n pending rows in order; with prefix rows, only while their sources are resident
        or a prefix row no live slot (nor this group) reads can take them: (rows, new source -> row)."""
        if not n_prefix:
            return [pending.popleft() for _ in range(min(n, len(pending)))], {}
        group: list[_Row] = []
        claimed: dict[int, int] = {}
        busy = set()
        while pending and len(group) < n:
            src = pending[0].source
            if resident.get(src) in claimed.values():
                break  # its prefix row goes to another source of this group (rows come grouped by source)
            if src not in resident and src not in claimed:
                free_rows = [p for p in range(n_prefix) if users[p] == 0 and p not in busy]
                if not free_rows:
                    break
                claimed[src] = min(free_rows, key=lambda p: p in resident.values())  # an empty row first
            busy.add(claimed.get(src, resident.get(src)))
            group.append(pending.popleft())
        return group, claimed

    def admit_shared(group: list[_Row], claimed: dict[int, int], slots: list[int], r: int):
        nonlocal state, prefix, stats
        for src, p in claimed.items():
            for evicted in [s for s, q in resident.items() if q == p]:
                del resident[evicted]
            resident[src] = p
        u = batch_bucket(max(1, len(claimed)), dp)
        ids, rows = np.zeros((u, t_len), np.int32), np.full(u, n_prefix, np.int32)
        for i, (src, p) in enumerate(claimed.items()):
            ids[i, :len(sources[src])], rows[i] = sources[src], p
        stats = stats + SamplerStats(prefill_tokens=sum(len(sources[src]) for src in claimed))
        row_src, row_len, slot_idx, key_ids, sample_ids = seat(group, slots, r, resident)
        for rw in group:
            users[resident[rw.source]] += 1
        state, prefix = _admit_shared(call.graphdef, call.params, state, prefix, put(ids), rep(rows), rep(row_src),
                                      rep(row_len), rep(slot_idx), rep(key_ids), rep(sample_ids), st=st)

    def resize(idx: list[int], new_length: int):
        nonlocal cache, state, slot_row, lens_h, t_h, length
        cache, state = _resize(cache, state, rep(np.asarray(idx, np.int32)), length=new_length, mesh=mesh)
        slot_row, lens_h, t_h = [slot_row[i] for i in idx], lens_h[idx], t_h[idx]
        length = new_length

    while True:
        free = [i for i, rw in enumerate(slot_row) if rw is None]
        if pending and length < t_len and not n_prefix:
            resize(list(range(len(slot_row))), length_for(t_len))
        while pending and len(free) >= min(refill, len(pending)) and free:
            big = len(free) == len(slot_row)  # an empty pool takes a full group: fewer prefills
            r, u = (len(slot_row), u_full) if big else (refill, u_refill)
            group, claimed = take(min(r, len(free)))
            if not group:
                break  # every prefix row is in use: wait for rows to finish
            if n_prefix:
                admit_shared(group, claimed, free[:len(group)], r)
            else:
                admit(group, free[:len(group)], r, u)
            free = free[len(group):]
        live = [i for i, rw in enumerate(slot_row) if rw is not None]
        if not live:
            break
        s_cur = len(slot_row)
        # the next position's slot in a row's own cache (with prefix rows it holds only new tokens)
        next_pos = int(max(t_h[i] + (0 if n_prefix else lens_h[i]) for i in live))
        # admissions write slots [0, t_len) unless the prompts live in the prefix rows
        target = length_for(max(next_pos, t_len if pending and not n_prefix else 0))
        half = s_cur // 2
        if not pending and len(live) <= half and half >= MIN_SLOTS and half % dp == 0:
            while len(live) <= half // 2 and half // 2 >= MIN_SLOTS and (half // 2) % dp == 0:
                half //= 2
            resize(live + free[:half - len(live)], target)
        elif length - next_pos < CHUNK_STEPS and length < cap or length > target + CHUNK_STEPS * 4:
            resize(list(range(s_cur)), target)
        s_cur = len(slot_row)
        live = [i for i, rw in enumerate(slot_row) if rw is not None]  # a resize renumbers the slots
        steps = min(CHUNK_STEPS, length - next_pos)
        idle = s_cur - len(live)
        if pending:
            free_target = idle + min(refill, len(pending))
        elif s_cur // 2 >= MIN_SLOTS and (s_cur // 2) % dp == 0:
            free_target = s_cur - s_cur // 2
        else:
            free_target = s_cur
        t0 = time.perf_counter()
        cache, state, ran = _chunk(call.graphdef, call.params, cache, state, prefix["cache"] if n_prefix else None,
                                   call.base_key, *call.scalars,
                                   call.stop_dev, call.table_dev, rep(np.int32(steps)), rep(np.int32(free_target)),
                                   st=st)
        done, t_now, ran = jax.device_get((state["done"], state["t"], ran))
        seconds = time.perf_counter() - t0
        finished = [i for i in live if done[i]]
        n_kept = 0
        if finished:
            toks, lps = jax.device_get((state["out_tok"], state["out_lp"]))
            if kept is not None:  # before the slots are refilled or the pool resized
                if kept[0][0].shape[2] < length:
                    kept = _grow(kept, length=length, mesh=mesh)
                slots, rows = np.zeros(s_cur, np.int32), np.full(s_cur, kept[0][0].shape[0], np.int32)
                slots[:len(finished)], rows[:len(finished)] = finished, [slot_row[i].out for i in finished]
                kept = _keep(kept, cache, rep(slots), rep(rows), mesh=mesh)
            for i in finished:
                n = int(t_now[i])
                if n_prefix:
                    users[resident[slot_row[i].source]] -= 1
                if results[slot_row[i].out] is not None:
                    raise RuntimeError(f"sampler: request {slot_row[i].out} answered twice")
                results[slot_row[i].out] = (toks[i, :n].tolist(), lps[i, :n].tolist())
                slot_row[i] = None
                n_kept += n
        t_h = np.asarray(t_now, np.int64)
        stats = stats + _step_stats(cfg, s_cur, length, int(ran), n_kept, seconds, n_prefix * t_len)
    lost = [rw.out for rw in order if results[rw.out] is None]
    if lost:
        raise RuntimeError(f"sampler: requests {lost[:5]} never answered")
    return stats, kept


def _prefix_rows(rows: int, sources: int, slots: int) -> int:
    """How many shared prefix rows a pool of `slots` slots keeps for `rows` rows of `sources`
    sources (0: none; each slot keeps its own prompt). They pay when sources have several rows
    each (rollouts of a solution's steps, n samples of a prompt): a step then reads each prompt once
    instead of once per row. Enough rows for the pool's share of sources plus one, so that a
    refill need not wait for a source's last row; at most MAX_PREFIX_ROWS, as every row's step
    computes its scores against all of them."""
    per_source = rows / sources
    need = math.ceil(slots / per_source) + 1
    return min(sources, need) if per_source >= 4 and need <= MAX_PREFIX_ROWS else 0


@dataclasses.dataclass(frozen=True)
class SamplerStats:
    """Decode work of sampler calls. slot_steps: token slots computed (rows in the program x decode
    steps); kept_tokens: tokens returned; flops / bytes: the model's matmul work and the bytes of
    weights and KV cache it reads over those steps (`step_cost`); decode_s: their wall time;
    prefill_tokens: the distinct prompt tokens prefilled (unpadded; see KVRows for reused ones)."""
    calls: int = 0
    decode_steps: int = 0
    slot_steps: int = 0
    kept_tokens: int = 0
    decode_s: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0
    prefill_tokens: int = 0  # prompt tokens run through the model (a kept cache's positions are not)

    def __add__(self, other: "SamplerStats") -> "SamplerStats":
        return SamplerStats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    @property
    def utilisation(self) -> float:
        """Share of the computed token slots that produced a returned token."""
        return self.kept_tokens / self.slot_steps if self.slot_steps else 0.0

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.decode_s / self.decode_steps if self.decode_steps else 0.0

    def floor_ms_per_step(self, flops_per_s: float, bytes_per_s: float) -> float:
        """The mean step's floor: the larger of its FLOPs at the matmul rate and its bytes at the
        memory bandwidth (both measured on the machine, e.g. by experiments/bench_sampler.py)."""
        if not self.decode_steps:
            return 0.0
        return 1e3 * max(self.flops / flops_per_s, self.bytes / bytes_per_s) / self.decode_steps

    def summary(self) -> str:
        return (f"decode utilisation {self.utilisation:.1%} ({self.kept_tokens} kept of {self.slot_steps} "
                f"computed token slots), {self.decode_steps} steps, {self.ms_per_step:.1f} ms/step")


def step_cost(cfg, rows: int, cache_len: int, prefix_len: int = 0) -> tuple[float, float]:
    """(FLOPs, bytes read) of one decode step of `rows` rows attending over cache_len positions of
    their own and prefix_len positions of shared prefix rows (all of them, by every row): the weight
    matmuls and attention's two matmuls; every weight (embeddings: only the LM head) and the K/V
    caches read once."""
    hd, h, kv = cfg.head_size, cfg.hidden_size, cfg.num_kv_heads
    per_layer = h * (cfg.num_heads + 2 * kv) * hd + cfg.num_heads * hd * h + 3 * h * cfg.intermediate_size
    weights = cfg.num_layers * per_layer + h * cfg.vocab_size
    flops = 2.0 * rows * weights + 4.0 * rows * cfg.num_layers * cfg.num_heads * hd * (cache_len + prefix_len)
    cache_bytes = 2.0 * cfg.num_layers * kv * hd * (rows * cache_len + prefix_len) * cache_dtype(cfg).itemsize
    return flops, weights * jnp.dtype(cfg.param_dtype).itemsize + cache_bytes


def _step_stats(cfg, rows: int, cache_len: int, steps: int, kept: int, seconds: float,
                prefix_len: int = 0) -> SamplerStats:
    flops, nbytes = step_cost(cfg, rows, cache_len, prefix_len)
    return SamplerStats(0, steps, rows * steps, kept, seconds, flops * steps, nbytes * steps)


_LAST = SamplerStats()
_TOTAL = [SamplerStats()]


def last_stats() -> SamplerStats:
    """The decode work of the last generate / generate_from_prefixes call."""
    return _LAST


def total_stats() -> SamplerStats:
    """The decode work of every sampler call in this process so far (a summary line can print
    the difference of two readings)."""
    return _TOTAL[0]


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop_ids: Sequence[int] | None = None,
             mesh: Mesh | None = None, return_logprobs: bool = False, *,
             key_ids: Sequence[int] | None = None, sample_ids: Sequence[int] | None = None,
             max_batch: int = DEFAULT_MAX_BATCH, batching: str = "continuous"):
    """Continue each prompt (a list of token ids; lengths may differ) with up to max_new_tokens ids.

    temperature 0 = greedy (top_p/top_k ignored); otherwise softmax(logits / temperature), then
    top-k (0 = off), then top-p (1 = off), sampled exactly (see prm_jax.sampling.select).
    stop_ids: a row ends after emitting any of them (the stop id is included in its output).
    Returns a list (per prompt, input order) of lists of new token ids, or (ids, logprobs) when
    return_logprobs. key_ids/sample_ids (default: prompt index / 0) fix each row's random stream,
    see the module docstring. max_batch bounds the rows decoded together (memory)."""
    prompts = _check_tokens(prompts, "prompts", model.cfg.vocab_size)
    key_ids = _check_ids(key_ids, len(prompts), "key_ids", range(len(prompts)))
    sample_ids = _check_ids(sample_ids, len(prompts), "sample_ids", [0] * len(prompts))
    rows = [_Row(i, i, len(p), key_ids[i], sample_ids[i]) for i, p in enumerate(prompts)]
    toks, lps, _ = _run(model, prompts, rows, max_new_tokens,
                        _strategy(temperature, top_p, top_k, model.cfg.vocab_size), temperature, top_p, seed,
                        stop_ids, mesh, return_logprobs, max_batch, batching=batching)
    return (toks, lps) if return_logprobs else toks


def stop_string_table(token_texts: Sequence[str], stop: str) -> np.ndarray:
    """The matcher of a stop string over token ids, for generate_from_prefixes(stop_table=...):
    table[k, v] = how much of `stop` the text ends with after token v's text (token_texts[v]) is
    appended to text ending with stop[:k] (a KMP automaton); len(stop) = the string is complete."""
    d = len(stop)
    if d == 0:
        raise ValueError("the stop string must not be empty")
    fail = [0] * (d + 1)  # fail[k]: longest proper border of stop[:k]
    for k in range(2, d + 1):
        b = fail[k - 1]
        while b and stop[b] != stop[k - 1]:
            b = fail[b]
        fail[k] = b + (stop[b] == stop[k - 1])
    chars = set(stop)
    table = np.zeros((d, len(token_texts)), np.int32)
    for v, text in enumerate(token_texts):
        if chars.isdisjoint(text):
            continue  # every state falls back to 0
        for k0 in range(d):
            k = k0
            for ch in text:
                while k and stop[k] != ch:
                    k = fail[k]
                k += stop[k] == ch
                if k == d:
                    break
            table[k0, v] = k
    return table


def share_sources(prefixes: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Group prefixes so that each is served by a longest sequence that starts with it.
    Returns (sources, source index per prefix). Uses lexicographic order: if a is a prefix of some
    b, the sequence right after a in sorted order also starts with a."""
    order = sorted(range(len(prefixes)), key=lambda i: prefixes[i])
    owner = [0] * len(prefixes)
    sources: list[list[int]] = []
    nxt = None  # index of the next prefix in sorted order
    for i in reversed(order):
        p = prefixes[i]
        if nxt is not None and len(prefixes[nxt]) >= len(p) and prefixes[nxt][:len(p)] == p:
            owner[i] = owner[nxt]
        else:
            owner[i] = len(sources)
            sources.append(p)
        nxt = i
    return sources, owner


def generate_from_prefixes(model, prefixes: Sequence[Sequence[int]], n: int | Sequence[int], max_new_tokens: int,
                           temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                           stop_ids: Sequence[int] | None = None, mesh: Mesh | None = None,
                           return_logprobs: bool = False, *, key_ids: Sequence[int] | None = None,
                           max_batch: int = DEFAULT_MAX_BATCH, stop_table: np.ndarray | None = None,
                           batching: str = "continuous", reuse: KVRows | None = None, return_cache: bool = False):
    """n continuations of every prefix, prefilling each distinct prefix once (a prefix contained in
    a longer one of the same call — e.g. problem + steps[:i] inside problem + steps[:i+1] — is not
    prefilled at all). Returns a list (per prefix) of n token lists (or (ids, logprobs) likewise).
    Sample j of prefix i uses key_id = key_ids[i] (default i) and sample_id = j: the same tokens
    generate() returns for that prompt with those ids. `n` may also be a list, one count per prefix
    (search expands its kept beams unevenly). stop_table (from stop_string_table): a row also ends
    once its new tokens' text contains that stop string, which may span tokens ("\\n" + "\\n").
    return_cache: also return the rows' KV caches (a KVRows, last in the returned tuple); reuse (a
    KVRows from an earlier call with the same model): a prefix equal to one of its rows' tokens
    (prefix + new ids) is not prefilled but read from that row's cache, all but its last token,
    which is fed again for its logits: extending a row costs one token, not its whole prefix. The
    keys are unchanged, so the tokens are those of a call without reuse, up to the rounding caveat
    of the module docstring (the kept keys/values were computed in decode steps, not one prefill).
    Other arguments as in generate()."""
    prefixes = _check_tokens(prefixes, "prefixes", model.cfg.vocab_size)
    counts = [n] * len(prefixes) if isinstance(n, int) else [int(c) for c in n]
    if len(counts) != len(prefixes) or any(c < 1 for c in counts):
        raise ValueError(f"n must be >= 1 (an int, or one count per prefix), got {n}")
    starts = np.cumsum([0] + counts).tolist()
    key_ids = _check_ids(key_ids, len(prefixes), "key_ids", range(len(prefixes)))
    sources, owner = share_sources(prefixes)
    rows = [_Row(starts[i] + j, owner[i], len(p), key_ids[i], j) for i, p in enumerate(prefixes)
            for j in range(counts[i])]
    toks, lps, kept = _run(model, sources, rows, max_new_tokens,
                           _strategy(temperature, top_p, top_k, model.cfg.vocab_size), temperature, top_p, seed,
                           stop_ids, mesh, return_logprobs, max_batch, stop_table, batching, reuse, return_cache)
    group = lambda xs: [xs[starts[i]:starts[i + 1]] for i in range(len(prefixes))]  # noqa: E731
    out = (group(toks), group(lps)) if return_logprobs else (group(toks),)
    out += (kept,) if return_cache else ()
    return out if len(out) > 1 else out[0]
