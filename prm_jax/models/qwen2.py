"""Qwen2 in Flax NNX: the backbone shared by the policy (causal LM) and the PRM.

Matches transformers' Qwen2 numerically: RMSNorm computed in f32, RoPE in the rotate-half
layout with f32 angles, grouped-query attention with q/k/v bias, SwiGLU MLP. Linear kernels
are stored [in, out] (the transpose of torch's weight). Every parameter carries logical axis
names that `prm_jax.parallel.mesh.RULES` maps onto the device mesh.

KV cache: one (k, v) pair per layer of shape [B, kv_heads, S, head_dim], where the slot of a
token is its position. `forward_cached` writes the new tokens' keys at their positions and lets
each query attend to slots <= its own position, which serves prefill (positions 0..T-1 of a
right-padded batch), shared-prefix continuation and one-token decode with a single code path.

The config (shape, presets, runtime fields, HF config.json) is `models.config.Qwen2Config`; the
speed-ups this page only picks live in `models.attention` (attention kernels) and `models.linear`
(the dense layers' matmul).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from prm_jax.models.attention import attend, prefixed_decode_attention
from prm_jax.models.config import Qwen2Config
from prm_jax.models.linear import matmul

Array = jax.Array
# remat_saves (runtime.REMAT_SAVES) -> what the forward keeps under remat
REMAT_POLICIES = {"nothing": None, "matmuls": jax.checkpoint_policies.save_only_these_names("matmul")}
KVCache = list  # [(k, v)] per layer, each [B, kv_heads, S, head_dim]


class SharedPrefix(NamedTuple):
    """Rows whose leading positions live in shared caches (`forward_cached(prefix=...)`, decode
    only): row b's positions [0, length[b]) are those of prefix row source[b] (cache: per layer
    (k, v) [U, kv_heads, P, head_dim]), and its own cache holds position p at slot p - length[b]."""
    cache: KVCache
    source: Array  # [B] int
    length: Array  # [B] int


# -- layers ------------------------------------------------------------------------------------

def _init(key, shape, dtype, scale):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias), kernel [in, out]; cast to the compute dtype at use."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str | None, str | None], *, bias: bool,
                 cfg: Qwen2Config, rngs: nnx.Rngs, std: float = 0.02):
        self.dtype = jnp.dtype(cfg.dtype)
        self.kernel = nnx.Param(_init(rngs.params(), (d_in, d_out), cfg.param_dtype, std), logical_axes=axes)
        self.bias = nnx.Param(jnp.zeros((d_out,), cfg.param_dtype), logical_axes=(axes[1],)) if bias else None

    def __call__(self, x: Array) -> Array:
        y = checkpoint_name(matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype)), "matmul")
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, cfg: Qwen2Config):
        self.eps = cfg.rms_norm_eps
        self.scale = nnx.Param(jnp.ones((dim,), cfg.param_dtype), logical_axes=("norm",))

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def rope_cos_sin(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos/sin [B, T, head_dim] in f32, HF layout (the half-frequencies repeated twice)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x [B, T, heads, D]; rotate-half as in transformers."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_size
        self.q_proj = Dense(d, cfg.num_heads * hd, ("embed", "heads"), bias=True, cfg=cfg, rngs=rngs)
        self.k_proj = Dense(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), bias=True, cfg=cfg, rngs=rngs)
        self.v_proj = Dense(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), bias=True, cfg=cfg, rngs=rngs)
        self.o_proj = Dense(cfg.num_heads * hd, d, ("heads", "embed"), bias=False, cfg=cfg, rngs=rngs)

    def queries(self, x: Array, positions: Array) -> Array:
        """[B,T,heads,D], rotated."""
        cfg = self.cfg
        cos, sin = rope_cos_sin(positions, cfg.head_size, cfg.rope_theta)
        return apply_rope(self.q_proj(x).reshape(*x.shape[:2], cfg.num_heads, cfg.head_size), cos, sin)

    def keys_values(self, x: Array, positions: Array) -> tuple[Array, Array]:
        """k (rotated) and v, each [B,T,kv_heads,D]."""
        cfg = self.cfg
        shape = (*x.shape[:2], cfg.num_kv_heads, cfg.head_size)
        cos, sin = rope_cos_sin(positions, cfg.head_size, cfg.rope_theta)
        return apply_rope(self.k_proj(x).reshape(shape), cos, sin), self.v_proj(x).reshape(shape)

    def __call__(self, x: Array, positions: Array, mask: Array, cache: tuple[Array, Array] | None = None,
                 prefix: tuple[Array, Array, Array, Array] | None = None) -> tuple[Array, tuple[Array, Array] | None]:
        """prefix (decode with a cache only): (k, v, mask [B,U,P], slot offset [B]) of the layer's
        shared prefix caches (see SharedPrefix)."""
        q, (k, v) = self.queries(x, positions), self.keys_values(x, positions)
        if prefix is not None:
            pk, pv, pmask, offset = prefix
            k, v = cache = _write_cache(cache, k, v, positions[:, 0] - offset)
            out = prefixed_decode_attention(q.astype(k.dtype), k, v, mask, pk, pv, pmask).astype(q.dtype)
        elif cache is not None:
            k, v = cache = _write_cache(cache, k, v, positions[:, 0])
            # in the cache's dtype: casting the cache would cost a pass over it per layer
            out = attend(q.astype(k.dtype), k, v, mask, "decode" if q.shape[1] == 1 else "full").astype(q.dtype)
        elif self.cfg.flash:
            out = attend(q, k, v, mask, "flash")
        else:  # no cache: full causal forward, k/v to the kv-head-major layout
            out = attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask, "causal")
        return self.o_proj(out.reshape(*x.shape[:2], -1)), cache

    def attend_at(self, h: Array, positions: Array, mask: Array | None, idx: Array) -> Array:
        """The attention output at positions idx [B,K] alone: keys and values from every token,
        queries only at idx. `mask` is the model's (None or non-causal for flash attention);
        causality is applied here from idx."""
        k, v = self.keys_values(h, positions)
        q = self.queries(rows(h, idx), rows(positions, idx))
        seen = jnp.arange(h.shape[1])[None, None, :] <= idx[:, :, None]
        if mask is not None:
            seen = seen & rows(mask, idx)
        out = attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), seen, "full")
        return self.o_proj(out.reshape(*idx.shape, -1))


def rows(a: Array, idx: Array) -> Array:
    """a [B, T, ...] at positions idx [B, K] -> [B, K, ...]."""
    return jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)


def _write_cache(cache: tuple[Array, Array], k: Array, v: Array, start: Array) -> tuple[Array, Array]:
    """Write k/v [B,T,K,D] into cache slots start[b] .. start[b]+T-1 of each row (cache [B,K,S,D])."""
    def row(c, new, s):
        return jax.lax.dynamic_update_slice(c, new.astype(c.dtype), (0, s, 0))
    ck, cv = cache
    return (jax.vmap(row)(ck, k.transpose(0, 2, 1, 3), start),
            jax.vmap(row)(cv, v.transpose(0, 2, 1, 3), start))


class MLP(nnx.Module):
    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Dense(d, f, ("embed", "mlp"), bias=False, cfg=cfg, rngs=rngs)
        self.up_proj = Dense(d, f, ("embed", "mlp"), bias=False, cfg=cfg, rngs=rngs)
        self.down_proj = Dense(f, d, ("mlp", "embed"), bias=False, cfg=cfg, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        # silu(gate) * up in f32 and rounded once: in bf16 each of its ops would round (and XLA:CPU convert)
        gate, up = self.gate_proj(x).astype(jnp.float32), self.up_proj(x).astype(jnp.float32)
        return self.down_proj((jax.nn.silu(gate) * up).astype(x.dtype))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, mask, cache=None, prefix=None):
        h, cache = self.self_attn(self.input_layernorm(x), positions, mask, cache, prefix)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache

    def at(self, x, positions, mask, idx):
        """The layer's output at positions idx [B,K] only (what a model read at K positions needs of
        its last layer): [B,K,H]."""
        x_k = rows(x, idx) + self.self_attn.attend_at(self.input_layernorm(x), positions, mask, idx)
        return x_k + self.mlp(self.post_attention_layernorm(x_k))


# -- models ------------------------------------------------------------------------------------

def default_positions(input_ids: Array, segment_ids: Array | None) -> Array:
    """0..T-1 per row, restarting at every new segment when sequences are packed."""
    b, t = input_ids.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
        return idx
    starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - start_idx


def full_mask(attention_mask: Array | None, segment_ids: Array | None, b: int, t: int,
              causal: bool = True) -> Array:
    """[B, T, T] bool: causal, keys not padding, and (if packed) same segment."""
    i = jnp.arange(t)
    mask = jnp.broadcast_to(i[None, :, None] >= i[None, None, :] if causal else True, (b, t, t))
    if attention_mask is not None:
        mask = mask & attention_mask.astype(bool)[:, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


class Qwen2Model(nnx.Module):
    """Embeddings + decoder layers + final norm; returns final hidden states."""

    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, param_dtype=jnp.dtype(cfg.param_dtype), dtype=jnp.dtype(cfg.dtype),
            embedding_init=nnx.with_metadata(nnx.initializers.normal(0.02), logical_axes=("vocab", "embed")),
            rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, *, positions: Array | None = None,
                 segment_ids: Array | None = None, only: Array | None = None) -> Array:
        """Final hidden states [B,T,H]; with `only` [B,K] positions, [B,K,H] at those alone (the last
        layer then runs its queries and MLP at K positions instead of T)."""
        input_ids = jnp.asarray(input_ids)
        b, t = input_ids.shape
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)
        if positions is None:
            positions = default_positions(input_ids, segment_ids)
        if self.cfg.flash:  # causality is the kernel's own; the rest goes in as a bias
            plain = attention_mask is None and segment_ids is None
            mask = None if plain else full_mask(attention_mask, segment_ids, b, t, causal=False)
        else:
            mask = full_mask(attention_mask, segment_ids, b, t)
        x = self.embed_tokens(input_ids)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if only is not None and i == last:
                run = lambda lyr, x_: lyr.at(x_, positions, mask, only)  # noqa: E731
            else:
                run = lambda lyr, x_: lyr(x_, positions, mask)[0]  # noqa: E731
            if self.cfg.remat:
                run = nnx.remat(run, policy=REMAT_POLICIES[self.cfg.remat_saves])
            x = run(layer, x)
        return self.norm(x)

    def forward_cached(self, input_ids: Array, positions: Array, cache: KVCache,
                       prefix: SharedPrefix | None = None) -> tuple[Array, KVCache]:
        """Run tokens [B,T] at `positions` [B,T] (contiguous per row) against the cache.
        Writes their keys at slots = positions; a query attends to slots <= its position.
        With a prefix (one token per row): slots = positions - prefix.length, and each query also
        attends to its shared prefix. Returns (final hidden states [B,T,H], updated cache)."""
        s = cache[0][0].shape[2]  # cache [B, K, S, D]
        if prefix is None:
            mask = jnp.arange(s)[None, None, :] <= positions[:, :, None]
            layer_prefixes = [None] * len(self.layers)
        else:
            if input_ids.shape[1] != 1:
                raise ValueError("forward_cached: a shared prefix serves one-token decode steps only")
            mask = jnp.arange(s)[None, None, :] <= (positions - prefix.length[:, None])[:, :, None]
            u, _, p, _ = prefix.cache[0][0].shape
            pmask = ((prefix.source[:, None, None] == jnp.arange(u)[None, :, None])
                     & (jnp.arange(p)[None, None, :] < prefix.length[:, None, None]))  # [B, U, P]
            layer_prefixes = [(pk, pv, pmask, prefix.length) for pk, pv in prefix.cache]
        x = self.embed_tokens(input_ids)
        new_cache = []
        for layer, layer_cache, layer_prefix in zip(self.layers, cache, layer_prefixes):
            x, layer_cache = layer(x, positions, mask, layer_cache, layer_prefix)
            new_cache.append(layer_cache)
        return self.norm(x), new_cache


def cache_dtype(cfg: Qwen2Config) -> jnp.dtype:
    """The KV cache's dtype: the compute dtype, but f32 on CPU. XLA:CPU runs a bf16 cache's per-step
    update in f32, converting the whole cache there and back in every layer: a bf16 decode step at
    64 rows x 768 positions took 294 ms against f32's 139; with the cache in f32 (exact: it holds
    bf16 values) the weights' matmuls keep their bf16 speed."""
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else cfg.dtype)


def init_cache(cfg: Qwen2Config, batch: int, length: int, dtype: Any = None) -> KVCache:
    """An empty KV cache: per layer (k, v) zeros [batch, kv_heads, length, head_dim]."""
    dtype = jnp.dtype(dtype or cache_dtype(cfg))
    shape = (batch, cfg.num_kv_heads, length, cfg.head_size)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]


class Qwen2ForCausalLM(nnx.Module):
    """The policy: backbone + LM head (tied to the embeddings when configured)."""

    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = Qwen2Model(cfg, rngs)
        self.lm_head = None if cfg.tie_word_embeddings else Dense(
            cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False, cfg=cfg, rngs=rngs)

    def logits(self, hidden: Array) -> Array:
        """LM logits in f32 from final hidden states."""
        if self.lm_head is None:
            w = self.model.embed_tokens.embedding[...].astype(hidden.dtype)
            return jnp.einsum("...d,vd->...v", hidden, w, preferred_element_type=jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, *, positions: Array | None = None,
                 segment_ids: Array | None = None) -> Array:
        return self.logits(self.model(input_ids, attention_mask, positions=positions, segment_ids=segment_ids))

    def forward_cached(self, input_ids: Array, positions: Array, cache: KVCache,
                       prefix: SharedPrefix | None = None) -> tuple[Array, KVCache]:
        """Hidden states (not logits: the sampler projects only the rows it needs) and the new cache."""
        return self.model.forward_cached(input_ids, positions, cache, prefix)

    def init_cache(self, batch: int, length: int, dtype: Any = None) -> KVCache:
        return init_cache(self.cfg, batch, length, dtype)
