"""Choosing the next token from a batch of logits: greedy, temperature, top-k, top-p.

Every function here is a pure, jit-friendly map from (logits [B, V], per-row keys) to token ids,
written so one decode step on a CPU stays far below the cost of the model's matrix products:

- no full-vocabulary sort (XLA:CPU sorts [32, 32000] in ~230 ms; `jnp.argmax` (8 ms) and
  `jnp.cumsum` (21 ms) over the vocabulary are also slow there), so argmax and sampling work in
  two levels over 128-token blocks: block maxima / block sums first, then inside one block;
- top-p over the full vocabulary is sampled *exactly* by rejection: candidates are drawn from the
  tempered distribution and the first one inside the nucleus is kept (acceptance >= top_p per
  candidate); a row that rejects every candidate falls back to an exact threshold found by
  bisection. The result is the renormalised nucleus distribution either way.

Nucleus definition (transformers' TopPLogitsWarper): token x is kept iff the probability mass of
the tokens strictly more likely than x is < top_p, so the most likely token is always kept.
Exact ties are all kept together (transformers breaks them by sort order). top-k keeps the k
most likely tokens; ties at the k-th value are broken by lower token id (transformers keeps all
tied tokens). Temperature is applied first, then top-k, then top-p, as in transformers.

Randomness: each row brings its own key; every random draw of a row is derived from that key
alone, so a row's token never depends on the other rows of the batch.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array
BLOCK = 128  # inverse-CDF block: the second-level cumulative sum runs over this many tokens
CANDIDATES = 4  # top-p rejection: candidates drawn per round (checked in one pass)
ROUNDS = 2  # top-p rejection rounds before the bisection fallback


@dataclasses.dataclass(frozen=True)
class Strategy:
    """The static part of a sampling configuration (what changes the compiled program).
    temperature and top_p are passed as traced scalars so changing them does not recompile."""
    greedy: bool = True
    top_k: int = 0  # 0 = off
    use_top_p: bool = False


def _blocks(x: Array, fill: float) -> Array:
    """[B, V] -> [B, nb, BLOCK], padding the vocabulary with `fill` up to a multiple of BLOCK."""
    b, v = x.shape
    nb = -(-v // BLOCK)
    return jnp.pad(x, ((0, 0), (0, nb * BLOCK - v)), constant_values=fill).reshape(b, nb, BLOCK)


def _last_true(mask: Array) -> Array:
    """Index of the last True along the last axis (-1 if none)."""
    iota = jax.lax.broadcasted_iota(jnp.int32, mask.shape, mask.ndim - 1)
    return jnp.max(jnp.where(mask, iota, -1), axis=-1)


def argmax_first(x: Array) -> Array:
    """argmax over the last axis of [B, V] (lowest index among ties), in two levels: the block
    holding the maximum, then the position inside it (jnp.argmax is ~8x slower on XLA:CPU)."""
    blocks = _blocks(x, -jnp.inf)
    block_max = jnp.max(blocks, axis=-1)  # [B, nb]
    m = jnp.max(block_max, axis=-1, keepdims=True)
    blk = jnp.argmax(block_max == m, axis=-1)  # first block holding the max
    row = jnp.take_along_axis(blocks, blk[:, None, None], axis=1)[:, 0]  # [B, BLOCK]
    j = jnp.argmax(row == m, axis=-1)
    return (blk * BLOCK + j).astype(jnp.int32)


def _uniform(keys: Array, n: int) -> Array:
    """[B, n] uniforms in [0, 1), row b drawn from keys[b] only."""
    return jax.vmap(lambda k: jax.random.uniform(k, (n,), jnp.float32))(keys)


@dataclasses.dataclass(frozen=True)
class Cdf:
    """Two-level cumulative distribution of non-negative weights [B, V] (need not sum to 1)."""
    blocks: Array  # [B, nb, BLOCK] weights, zero-padded
    block_cum: Array  # [B, nb] inclusive cumulative block sums

    @classmethod
    def of(cls, weights: Array) -> "Cdf":
        blocks = _blocks(weights, 0.0)
        return cls(blocks, jnp.cumsum(jnp.sum(blocks, axis=-1), axis=-1))

    @property
    def total(self) -> Array:
        return self.block_cum[:, -1]

    def sample(self, u: Array) -> Array:
        """Indices [B, M] for uniforms u [B, M]: index i with probability weights[i] / total.
        Finds the block whose cumulative mass passes u * total, then the token inside it; a
        rounding overshoot is pulled back to the last positive weight, so a zero-weight index
        is never returned."""
        block_cum = self.block_cum
        nb = block_cum.shape[-1]
        target = u * block_cum[:, -1:]
        blk = jnp.sum(block_cum[:, None, :] <= target[:, :, None], axis=-1)  # [B, M]
        block_sum = jnp.diff(block_cum, axis=-1, prepend=0.0)
        blk = _last_true((block_sum[:, None, :] > 0) & (jnp.arange(nb)[None, None, :] <= blk[:, :, None]))
        before = jnp.where(blk > 0, jnp.take_along_axis(block_cum, jnp.maximum(blk - 1, 0), axis=1), 0.0)
        rows = jnp.take_along_axis(self.blocks, blk[:, :, None], axis=1)  # [B, M, BLOCK]
        within = jnp.cumsum(rows, axis=-1)
        j = jnp.sum(within <= (target - before)[:, :, None], axis=-1)
        j = _last_true((rows > 0) & (jnp.arange(BLOCK)[None, None, :] <= j[:, :, None]))
        return (blk * BLOCK + j).astype(jnp.int32)


def inverse_cdf(weights: Array, u: Array) -> Array:
    """Sample indices [B, M] from non-negative weights [B, V] at uniforms u [B, M]."""
    return Cdf.of(weights).sample(u)


def mass_above(weights: Array, values: Array) -> Array:
    """For weights [B, V] and values [B, M]: sum of the weights strictly greater than each value."""
    return jnp.sum(jnp.where(weights[:, None, :] > values[:, :, None], weights[:, None, :], 0.0), axis=-1)


def nucleus_threshold(weights: Array, limit: Array) -> Array:
    """Smallest weight kept by top-p, per row [B], where limit [B] = top_p * total weight; found
    exactly by bisection over the float bit patterns (non-negative floats order like their int32
    bits): the nucleus is weights >= the returned value."""
    hi = jax.lax.bitcast_convert_type(jnp.max(weights, axis=-1), jnp.int32)  # mass above max = 0 < limit
    lo = jnp.zeros_like(hi)  # invariant: mass_above(lo) >= limit (almost all the mass is above 0)

    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        keep = mass_above(weights, jax.lax.bitcast_convert_type(mid, jnp.float32)[:, None])[:, 0] < limit
        return jnp.where(keep, lo, mid), jnp.where(keep, mid, hi)

    _, hi = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return jax.lax.bitcast_convert_type(hi, jnp.float32)


def _top_p_full(weights: Array, keys: Array, top_p: Array) -> Array:
    """Exact top-p sample over the full vocabulary from unnormalised weights [B, V]: rejection
    from the whole distribution, bisection fallback (see module docstring)."""
    b = weights.shape[0]
    cdf = Cdf.of(weights)
    limit = top_p * cdf.total

    def draw(r, state):
        chosen, found = state
        cand = cdf.sample(_uniform(jax.vmap(lambda k: jax.random.fold_in(k, r))(keys), CANDIDATES))  # [B, M]
        inside = mass_above(weights, jnp.take_along_axis(weights, cand, axis=1)) < limit[:, None]
        hit = jnp.any(inside, axis=-1)
        first = jnp.argmax(inside, axis=-1)  # first accepted candidate (0 if none)
        new = jnp.take_along_axis(cand, first[:, None], axis=1)[:, 0]
        return jnp.where(hit & ~found, new, chosen), found | hit

    def cond(state):
        r, (_, found) = state
        return (r < ROUNDS) & ~jnp.all(found)

    _, (chosen, found) = jax.lax.while_loop(
        cond, lambda s: (s[0] + 1, draw(s[0], s[1])), (0, (jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool))))

    def fallback(chosen):
        tau = nucleus_threshold(weights, limit)
        kept = jnp.where(weights >= tau[:, None], weights, 0.0)
        u = _uniform(jax.vmap(lambda k: jax.random.fold_in(k, ROUNDS))(keys), 1)
        return jnp.where(found, chosen, inverse_cdf(kept, u)[:, 0])

    return jax.lax.cond(jnp.all(found), lambda c: c, fallback, chosen)


def _top_k(scaled: Array, keys: Array, top_p: Array, strategy: Strategy) -> Array:
    vals, idx = jax.lax.top_k(scaled, strategy.top_k)  # sorted, most likely first
    probs = jax.nn.softmax(vals, axis=-1)
    if strategy.use_top_p:
        above = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens (sorted order)
        probs = jnp.where(above < top_p, probs, 0.0)
    j = inverse_cdf(probs, _uniform(keys, 1))[:, 0]
    return jnp.take_along_axis(idx, j[:, None], axis=1)[:, 0].astype(jnp.int32)


def choose(logits: Array, keys: Array, temperature: Array, top_p: Array, strategy: Strategy) -> Array:
    """Next token ids [B] from f32 logits [B, V]; keys [B] (one typed PRNG key per row, already
    specific to this step)."""
    if strategy.greedy:
        return argmax_first(logits)
    scaled = logits / temperature
    if strategy.top_k:
        return _top_k(scaled, keys, top_p, strategy)
    weights = jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True))  # softmax up to its normaliser
    if strategy.use_top_p:
        return _top_p_full(weights, keys, top_p)
    return inverse_cdf(weights, _uniform(keys, 1))[:, 0]
