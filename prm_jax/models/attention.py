"""Attention implementations for the Qwen2 model, behind one `attend(q, k, v, mask, impl)`.

They compute the same function (softmax in f32) and differ in how fast XLA runs them: the layouts,
the hand-written backward, the skipped causal blocks and the one-query decode are measured choices
for XLA:CPU, and `flash` is cuDNN's fused kernel on NVIDIA GPUs. The model (qwen2.py) only picks one.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from prm_jax.models import cpu_kernels
from prm_jax.models.linear import dot

Array = jax.Array
IMPLS = ("full", "causal", "decode", "flash")  # and `prefixed_decode_attention`, called directly


def attend(q: Array, k: Array, v: Array, mask: Array | None, impl: str) -> Array:
    """q [B,T,H,D] -> [B,T,H,D] by `impl`:
    - "full": any mask [B,T,S]; k/v kv-head-major [B,K,S,D] (the KV cache's layout);
    - "causal": the same for a full forward's causal mask, fully masked blocks skipped;
    - "decode": one query per row against the cache (T = 1), forward only;
    - "flash": fused causal attention, k/v [B,T,K,D], `mask` only what causality does not cover."""
    if impl == "full":
        return attention(q, k, v, mask)
    if impl == "causal":
        return causal_attention(q, k, v, mask)
    if impl == "decode":
        return decode_attention(q, k, v, mask)
    if impl == "flash":
        return flash_attention(q, k, v, mask)
    raise ValueError(f"attention impl {impl!r}: expected one of {', '.join(IMPLS)}")


def _merge_heads(x: Array, kv: int) -> Array:
    """[B,T,H,D] -> [B,K,G*T,D]: the G query heads of each kv head merged with the T queries."""
    b, t, h, d = x.shape
    return x.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, h // kv * t, d)


def _split_heads(x: Array, t: int) -> Array:
    """[B,K,G*T,D] -> [B,T,H,D], the inverse of `_merge_heads`."""
    b, kv, gt, d = x.shape
    return x.reshape(b, kv, gt // t, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, gt // t * kv, d)


def _masked_scores(qm: Array, k: Array, mask: Array, g: int) -> Array:
    """The scores (qm already scaled by 1/sqrt(D)) in f32, [B,K,G,T,S]; masked keys at the f32 minimum."""
    b, kv, gt, _ = qm.shape
    scores = jnp.einsum("bkqd,bksd->bkqs", qm, k, preferred_element_type=jnp.float32).reshape(b, kv, g, gt // g, -1)
    return jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)


def _attention_probs(qm: Array, k: Array, mask: Array, g: int) -> Array:
    """Softmax over keys of the scores, f32, [B,K,G*T,S]; masked keys get weight 0."""
    b, kv, gt, _ = qm.shape
    return jax.nn.softmax(_masked_scores(qm, k, mask, g), axis=-1).reshape(b, kv, gt, -1)


def _inv_sqrt(x: Array) -> Array:
    """1/sqrt(head size), in x's dtype: the score scale, folded into q ([T,D]) rather than the scores ([T,S])."""
    return jnp.asarray(1.0 / math.sqrt(x.shape[-1]), x.dtype)


@jax.custom_vjp
def attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """q [B,T,H,D], k/v [B,K,S,D] (H = K*G), mask [B,T,S] bool -> [B,T,H,D]. Softmax in f32.
    The G query heads of a kv head are merged with the T queries into one matmul dimension, and
    k/v are kv-head-major (the KV cache's own layout), so both matmuls are plain batched matmuls
    over (B, K) with no transpose of the cache: on XLA:CPU about 2x faster than separate g/t
    axes, and the cache is not copied on every decode step. The backward is hand-written
    (`_attention_bwd`).

    Without a gradient (scoring, prefill) the softmax is normalised after the value product: the
    exponentials, rounded once to v's dtype, go into it, and its [T,D] result is divided by their
    sum (of the rounded values, so the weights sum to one exactly). That saves a division pass over
    the [T,S] scores and, in bf16, an f32 copy of them: the small PRM's bf16 scoring forward ran 12%
    faster at [8, 1024] and [4, 2048] (A/B in one process; summing the unrounded f32 exponentials
    instead kept only 1-5% of it).

    In bf16 on an x86 CPU with AVX-512 BF16 that is computed by `cpu_kernels.attention_bf16`."""
    if cpu_kernels.attention_applies(q, k, v):  # the same function in one pass (cpu_kernels.py)
        return cpu_kernels.attention_bf16(q * _inv_sqrt(q), k, v, mask)
    kv = k.shape[1]
    b, t, h, _ = q.shape
    scores = _masked_scores(_merge_heads(q * _inv_sqrt(q), kv), k, mask, h // kv)
    weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True)).astype(v.dtype)
    total = jnp.sum(weights.astype(jnp.float32), axis=-1, keepdims=True)
    out = jnp.einsum("bkgqs,bksd->bkgqd", weights, v, preferred_element_type=jnp.float32) / total
    return _split_heads(out.reshape(b, kv, h // kv * t, -1).astype(v.dtype), t)


def _attention_fwd(q, k, v, mask):
    kv = k.shape[1]
    qm = _merge_heads(q * _inv_sqrt(q), kv)
    probs = _attention_probs(qm, k, mask, q.shape[2] // kv)
    out = dot("bkqs,bksd->bkqd", probs.astype(v.dtype), v)
    return _split_heads(out, q.shape[1]), (qm, k, v, probs, out)


def _attention_bwd(res, d_out):
    """The softmax backward as flash attention writes it: sum_s(P * dP) over the [T,S] scores
    equals sum_d(dO * O) over the [T,D] output, so no pass over the scores is spent on it. Autodiff's
    version costs more passes over [T,S] tensors, which bound attention on XLA:CPU: the benchmark's
    PRM train step (8x512 rows) ran 4% and 11% faster with this one (two interleaved A/B runs in one process)."""
    qm, k, v, probs, out = res
    kv = k.shape[1]
    dom = _merge_heads(d_out, kv)
    dv = dot("bkqs,bkqd->bksd", probs.astype(v.dtype), dom)
    dp = jnp.einsum("bkqd,bksd->bkqs", dom, v, preferred_element_type=jnp.float32)
    delta = jnp.sum(dom.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    ds = (probs * (dp - delta)).astype(qm.dtype)
    dq = dot("bkqs,bksd->bkqd", ds, k) * _inv_sqrt(qm)
    dk = dot("bkqs,bkqd->bksd", ds, qm)
    return _split_heads(dq, d_out.shape[1]), dk, dv, None


attention.defvjp(_attention_fwd, _attention_bwd)


# Query blocks of a full causal forward: max(128, T // CAUSAL_BLOCKS) queries each. Attention on XLA:CPU
# is bound by passes over the f32 scores, not by FLOPs, so every masked block skipped counts: at T = 2048,
# 16 blocks (128 queries) ran 22% faster than 4 (512), at T = 4096 13% (one layer, 8 and 4 rows); the small
# PRM's whole forward at [8, 2048] 10% faster (558 vs 507 tok/s, A/B in one process on a loaded 2-core CPU).
CAUSAL_BLOCKS = 16


def causal_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """`attention` for a mask that is causal (query i never sees key j > i), as in a full forward:
    query blocks attend only to the keys up to their own end, skipping the fully masked upper
    blocks (about 47% of the work at 16 blocks). Exact: the skipped scores would get zero weight.
    The CPU kernel skips masked keys itself, so without a gradient it takes all queries in one call
    (15-20% faster than one call per block at 512-4096 tokens)."""
    if cpu_kernels.attention_applies(q, k, v):
        return _causal_in_one_call(q, k, v, mask)
    return _causal_blocks(q, k, v, mask)


@jax.custom_vjp
def _causal_in_one_call(q, k, v, mask):
    return attention(q, k, v, mask)


def _causal_in_one_call_fwd(q, k, v, mask):
    return jax.vjp(_causal_blocks, q, k, v, mask)  # a gradient runs XLA's blocks, as without the kernel


_causal_in_one_call.defvjp(_causal_in_one_call_fwd, lambda vjp, d_out: vjp(d_out))


def _causal_blocks(q: Array, k: Array, v: Array, mask: Array) -> Array:
    t = q.shape[1]
    block = max(128, t // CAUSAL_BLOCKS)
    if t <= block:
        return attention(q, k, v, mask)
    outs = []
    for start in range(0, t, block):
        end = min(t, start + block)
        outs.append(attention(q[:, start:end], k[:, :, :end], v[:, :, :end], mask[:, start:end, :end]))
    return jnp.concatenate(outs, axis=1)


def decode_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """`attention` for one query per row (a decode step against the KV cache; forward only):
    q [B,1,H,D], k/v [B,K,S,D], mask [B,1,S]. The cache is the left operand of both matmuls
    ([S,D] @ [D,G] for the scores, [D,S] @ [S,G] for the output), so each (row, kv head) is one
    matmul with S rows rather than one with G (= 4 or so) rows: on XLA:CPU 3x faster at 64 rows x
    768 positions (8.7 vs 23 ms a layer), close to the time it takes to read the cache once."""
    if cpu_kernels.decode_applies(q, k, v):  # the same function, reading the cache's filled part once
        return cpu_kernels.decode_f32(q * _inv_sqrt(q), k, v, mask)
    b, _, h, d = q.shape
    kv = k.shape[1]
    qg = (q * _inv_sqrt(q)).reshape(b, kv, h // kv, d)  # head = kv head * G + g, as in _merge_heads
    scores = jnp.einsum("bksd,bkgd->bksg", k, qg, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, 0][:, None, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=2)
    out = dot("bksd,bksg->bkdg", v, probs.astype(v.dtype))  # [B,K,D,G]
    return out.transpose(0, 1, 3, 2).reshape(b, 1, h, d)


def prefixed_decode_attention(q: Array, k: Array, v: Array, mask: Array, pk: Array, pv: Array,
                              pmask: Array) -> Array:
    """`decode_attention` over two key sets: the row's own cache k/v [B,K,S,D] (mask [B,1,S]) and
    shared prefix caches pk/pv [U,K,P,D], of which row b sees positions pmask[b] [U,P] (its source's
    first positions). The prefix scores of all rows are one [B*G, D] @ [D, U*P] product per kv head
    rather than B products with G rows each, and each prefix is read once per step rather than once
    per row: for U << B (rollouts of a few solutions) that is most of a decode step's attention.
    One softmax over both sets (f32), normalised after the value products."""
    b, _, h, d = q.shape
    kv = k.shape[1]
    neg = jnp.finfo(jnp.float32).min
    qg = (q * _inv_sqrt(q)).reshape(b, kv, h // kv, d)
    own = jnp.einsum("bksd,bkgd->bksg", k, qg, preferred_element_type=jnp.float32)
    own = jnp.where(mask[:, 0][:, None, :, None], own, neg)
    pre = jnp.einsum("bkgd,ukpd->bkgup", qg, pk, preferred_element_type=jnp.float32)
    pre = jnp.where(pmask[:, None, None], pre, neg)
    top = jnp.maximum(jnp.max(own, axis=2), jnp.max(pre, axis=(3, 4)))  # [B,K,G]
    own = jnp.exp(own - top[:, :, None, :])
    pre = jnp.exp(pre - top[..., None, None])
    total = jnp.sum(own, axis=2) + jnp.sum(pre, axis=(3, 4))
    out = dot("bksd,bksg->bkdg", v, own.astype(v.dtype)).transpose(0, 1, 3, 2)
    out = out + dot("bkgup,ukpd->bkgd", pre.astype(pv.dtype), pv)
    return (out / total[..., None]).reshape(b, 1, h, d)


def flash_attention(q: Array, k: Array, v: Array, mask: Array | None, implementation: str = "cudnn") -> Array:
    """Causal fused attention (cuDNN flash on NVIDIA GPUs: the fully masked upper tiles are skipped).
    q [B,T,H,D], k/v [B,T,K,D]. `mask` [B,T,S] holds only what causality does not (same segment, key
    not padding) and goes in as a bias; None for rows that each hold one sequence, right-padded or not
    (a real token never sees a later pad), and then no [B,T,T] bias is read at all."""
    bias = None if mask is None else jnp.where(mask[:, None], 0.0, -1e9).astype(q.dtype)
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=True, implementation=implementation)
    return checkpoint_name(out, "matmul")
