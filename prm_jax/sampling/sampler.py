"""Batched generation for the Flax causal LM: prefill, then one jitted `lax.while_loop` decode.

Public API
----------
- `generate(model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=0,
  stop_ids=None, mesh=None, return_logprobs=False)` -> new token ids per prompt.
- `generate_from_prefixes(model, prefixes, n, max_new_tokens, ...)` -> n continuations per prefix,
  each prefix prefilled once (and a prefix that is a prefix of another one in the same call is
  not prefilled at all: it reuses the longer one's cache rows).
- `compile_count()` / `compile_log()`: how many programs the sampler has compiled in this process.

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

How it runs: prompts are sorted by length and cut into batches of at most `max_batch` rows.
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
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from prm_jax.parallel.mesh import batch_sharding, logical_spec, state_shardings
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


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest size >= max(n, minimum) in {2^k, 3 * 2^(k-1)} (1, 2, 3, 4, 6, 8, 12, 16, 24, ...)."""
    n = max(n, minimum, 1)
    p = 1
    while p < n:
        if p >= 2 and p // 2 * 3 >= n:
            return p // 2 * 3
        p *= 2
    return p


def _batch_bucket(n: int, dp: int) -> int:
    b = bucket(n, dp)
    return -(-b // dp) * dp


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


def _constrain(cache, mesh):
    if mesh is None:
        return cache
    return [tuple(jax.lax.with_sharding_constraint(a, _cache_sharding(mesh, a.shape)) for a in kv) for kv in cache]


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


# -- host side -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Row:
    out: int  # index into the flat result list
    source: int  # index into the sources list
    length: int  # prompt length (<= the source's length)
    key_id: int
    sample_id: int


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


def _run(model, sources: list[list[int]], rows: list[_Row], max_new_tokens: int, strategy: Strategy,
         temperature: float, top_p: float, seed: int, stop_ids, mesh, return_logprobs: bool,
         max_batch: int, stop_table: np.ndarray | None = None) -> tuple[list[list[int]], list[list[float]]]:
    """Sample every row (grouped by source, longest first) in batches of <= max_batch rows."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    vocab = model.cfg.vocab_size
    stops = sorted({int(s) for s in (stop_ids or ())})
    if any(not 0 <= s < vocab for s in stops):
        raise ValueError(f"stop_ids must lie in [0, {vocab}), got {stops}")
    stop_arr = np.full((bucket(len(stops), 8),), -1, np.int32)
    stop_arr[:len(stops)] = stops
    dp = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    new_len = bucket(max_new_tokens, 8)
    graphdef, params = nnx.split(model)
    if mesh is not None:  # a no-op when the model was created sharded on this mesh
        params = jax.device_put(params, state_shardings(params, mesh))
    base_key = jax.random.key(seed)
    put = (lambda a: jax.device_put(a, batch_sharding(mesh, a.ndim))) if mesh is not None else jnp.asarray
    rep = (lambda a: jax.device_put(a, NamedSharding(mesh, jax.sharding.PartitionSpec()))) if mesh else jnp.asarray
    scalars = [rep(np.asarray(x, dt)) for x, dt in
               ((max_new_tokens, np.int32), (max(temperature, 1e-6), np.float32), (top_p, np.float32))]
    stop_dev, base_key = rep(stop_arr), rep(base_key)
    if stop_table is not None and (stop_table.ndim != 2 or stop_table.shape[1] != vocab):
        raise ValueError(f"stop_table must be [len(stop string), vocab={vocab}], got {stop_table.shape}")
    table_dev = rep(np.zeros((1, 1), np.int32) if stop_table is None else np.asarray(stop_table, np.int32))

    order = sorted(rows, key=lambda rw: (-len(sources[rw.source]), rw.source, rw.out))
    chunks = [order[start:start + max_batch] for start in range(0, len(order), max_batch)]
    # Every batch of a call gets the first one's row count and the most sources any batch has, so
    # a call's short last batch reuses its programs: a compile costs more than padded rows.
    r = _batch_bucket(len(chunks[0]), dp) if chunks else 0
    u = max((_batch_bucket(len({rw.source for rw in c}), dp) for c in chunks), default=0)
    results: list[Any] = [None] * len(rows)
    for chunk in chunks:
        src_ids = list(dict.fromkeys(rw.source for rw in chunk))
        src_pos = {s: i for i, s in enumerate(src_ids)}
        t = bucket(max(len(sources[s]) for s in src_ids), 16)
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
        st = _Static(cache_len=t + new_len, mesh=mesh)
        cache, logits0 = _prefill(graphdef, params, put(ids), put(row_src), put(lens), st=st)
        st = dataclasses.replace(st, strategy=strategy, new_len=new_len, logprobs=return_logprobs,
                                 stop_string=stop_table is not None)
        toks, lps, _ = _decode(graphdef, params, cache, logits0, put(lens), put(key_ids), put(sample_ids),
                            put(done), base_key, *scalars[:1], *scalars[1:], stop_dev, table_dev, st=st)
        toks, lps = np.asarray(jax.device_get(toks)), np.asarray(jax.device_get(lps))
        for i, rw in enumerate(chunk):
            row = toks[i, :max_new_tokens]
            n = int(np.argmax(row < 0)) if (row < 0).any() else len(row)
            results[rw.out] = (row[:n].tolist(), lps[i, :n].tolist())
    return [x[0] for x in results], [x[1] for x in results]


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop_ids: Sequence[int] | None = None,
             mesh: Mesh | None = None, return_logprobs: bool = False, *,
             key_ids: Sequence[int] | None = None, sample_ids: Sequence[int] | None = None,
             max_batch: int = DEFAULT_MAX_BATCH):
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
    toks, lps = _run(model, prompts, rows, max_new_tokens, _strategy(temperature, top_p, top_k, model.cfg.vocab_size),
                     temperature, top_p, seed, stop_ids, mesh, return_logprobs, max_batch)
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
                           max_batch: int = DEFAULT_MAX_BATCH, stop_table: np.ndarray | None = None):
    """n continuations of every prefix, prefilling each distinct prefix once (a prefix contained in
    a longer one of the same call — e.g. problem + steps[:i] inside problem + steps[:i+1] — is not
    prefilled at all). Returns a list (per prefix) of n token lists (or (ids, logprobs) likewise).
    Sample j of prefix i uses key_id = key_ids[i] (default i) and sample_id = j: the same tokens
    generate() returns for that prompt with those ids. `n` may also be a list, one count per prefix
    (search expands its kept beams unevenly). stop_table (from stop_string_table): a row also ends
    once its new tokens' text contains that stop string, which may span tokens ("\\n" + "\\n").
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
    toks, lps = _run(model, sources, rows, max_new_tokens, _strategy(temperature, top_p, top_k, model.cfg.vocab_size),
                     temperature, top_p, seed, stop_ids, mesh, return_logprobs, max_batch, stop_table)
    group = lambda xs: [xs[starts[i]:starts[i + 1]] for i in range(len(prefixes))]  # noqa: E731
    return (group(toks), group(lps)) if return_logprobs else group(toks)
