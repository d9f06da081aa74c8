"""The CPU attention kernel (models/cpu_kernels.py) against the definition, computed here in float64 with
the same two roundings (the softmax weights to bf16 before the value product, the output to bf16)."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prm_jax.models import attention as A
from prm_jax.models import cpu_kernels

pytestmark = pytest.mark.skipif(
    not (jax.default_backend() == "cpu" and cpu_kernels.available()),
    reason="the CPU attention kernel needs x86 Linux with AVX-512 BF16 and a C++ compiler")


def reference(q, k, v, mask):
    """out[b,t,h] = sum_s w v / sum_s w, w = bf16(exp(q.k/sqrt(D) - max)) over unmasked keys; a query with no
    unmasked key gets equal weights over all keys (the softmax of equal scores)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, d = q.shape
    g = h // k.shape[1]
    scale = float(ml_dtypes.bfloat16(1 / np.sqrt(d)))  # the model scales q in bf16
    q = np.asarray(np.asarray(q * scale, ml_dtypes.bfloat16), np.float64)
    out = np.zeros(q.shape)
    for i in range(b):
        for j in range(t):
            for head in range(h):
                keep = mask[i, j] if mask[i, j].any() else np.ones_like(mask[i, j])
                s = k[i, head // g] @ q[i, j, head]
                w = np.where(keep, np.exp(np.where(keep, s, -np.inf) - s[keep].max()), 0.0)
                if not mask[i, j].any():
                    w = np.ones_like(s)
                w = np.asarray(np.asarray(w, ml_dtypes.bfloat16), np.float64)
                out[i, j, head] = w @ v[i, head // g] / w.sum()
    return np.asarray(out.astype(ml_dtypes.bfloat16), np.float64)


def operands(seed, b, t, s, h, kv, d):
    r = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(r.normal(size=shape), jnp.bfloat16) for shape in
               ((b, t, h, d), (b, kv, s, d), (b, kv, s, d)))
    return q, k, v, r


def check(out, q, k, v, mask):
    """Equal to the reference but for a bf16 rounding step of a few outputs (the kernel's exp and sums
    round differently from float64 ones)."""
    ref = reference(q, k, v, mask)
    diff = np.abs(np.asarray(out, np.float64) - ref)
    assert np.all(diff <= 2 ** -7 * np.abs(ref) + 2e-3), float(diff.max())
    assert np.mean(diff > 0) < 0.1


def test_kernel_equals_the_definition_on_a_causal_mask_with_padding(monkeypatch):
    q, k, v, _ = operands(0, 3, 70, 70, 8, 2, 64)
    lengths = np.array([70, 33, 1])
    mask = np.tril(np.ones((70, 70), bool))[None] & (np.arange(70)[None, :] < lengths[:, None])[:, None, :]
    assert cpu_kernels.attention_applies(q, k, v)
    out = jax.jit(lambda *a: A.attention(*a))(q, k, v, jnp.asarray(mask))
    check(out, q, k, v, mask)
    # XLA's own path (the one other CPUs run) meets the same bound
    monkeypatch.setattr(cpu_kernels, "attention_applies", lambda *a: False)
    check(jax.jit(lambda *a: A.attention(*a))(q, k, v, jnp.asarray(mask)), q, k, v, mask)


def test_kernel_equals_the_definition_on_any_mask_and_head_shape():
    # 7 query heads per kv head, head size 128, fewer queries than keys (the scorer's last layer),
    # a random mask and a query that sees no key at all
    q, k, v, r = operands(1, 2, 5, 300, 14, 2, 128)
    mask = r.random((2, 5, 300)) < 0.3
    mask[1, 2] = False
    out = jax.jit(lambda *a: A.attention(*a))(q, k, v, jnp.asarray(mask))
    check(out, q, k, v, mask)


def test_kernel_rows_split_over_a_mesh_equal_the_whole_batch():
    q, k, v, r = operands(2, 8, 40, 40, 8, 2, 64)
    mask = jnp.asarray(np.tril(np.ones((40, 40), bool))[None] & (r.random((8, 1, 40)) < 0.9))
    whole = jax.jit(lambda *a: A.attention(*a))(q, k, v, mask)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (q, k, v, mask)]
    split = jax.jit(lambda *a: A.attention(*a))
    assert "all-gather" not in split.lower(*rows).compile().as_text()  # each device runs its own rows
    np.testing.assert_array_equal(np.asarray(split(*rows), np.float32), np.asarray(whole, np.float32))


def test_decode_kernel_equals_softmax_attention_over_the_filled_cache():
    # rows filled to different depths of a longer cache (the kernel reads only up to the last unmasked
    # key), 7 query heads per kv head, head size 128, and a row with no unmasked key
    q, k, v, r = operands(3, 5, 1, 200, 14, 2, 128)
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    filled = np.array([1, 17, 120, 199, 0])
    mask = (np.arange(200)[None, :] <= filled[:, None])[:, None, :]
    mask[4] = False
    assert cpu_kernels.decode_applies(q, k, v)
    out = np.asarray(jax.jit(lambda *a: A.decode_attention(*a))(q, k, v, jnp.asarray(mask)), np.float64)
    qd, kd, vd = (np.asarray(x, np.float64) for x in (q, k, v))
    for b in range(5):
        for h in range(14):
            keep = mask[b, 0] if mask[b, 0].any() else np.ones(200, bool)
            s = kd[b, h // 7, keep] @ qd[b, 0, h] / np.sqrt(128)
            w = np.exp(s - s.max()) if mask[b, 0].any() else np.ones(200)  # all masked: equal scores
            np.testing.assert_allclose(out[b, 0, h], w @ vd[b, h // 7, keep] / w.sum(), atol=2e-6, rtol=1e-5)
