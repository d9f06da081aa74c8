"""Quick sanity of the core model pieces against hand-computed cases (full HF parity lives in test_hf.py)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prm_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM, SharedPrefix, default_positions, rope_cos_sin


def test_packed_positions_restart_per_segment():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    pos = default_positions(jnp.zeros_like(seg), seg)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def test_rope_matches_closed_form():
    cos, sin = rope_cos_sin(jnp.array([[3]]), head_dim=4, theta=100.0)
    freqs = np.array([1.0, 100.0 ** -0.5])
    np.testing.assert_allclose(np.asarray(cos)[0, 0], np.cos(3 * np.r_[freqs, freqs]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sin)[0, 0], np.sin(3 * np.r_[freqs, freqs]), rtol=1e-6)


def test_cached_forward_equals_full_forward():
    cfg = Qwen2Config.preset("tiny", vocab_size=50)
    m = Qwen2ForCausalLM(cfg, nnx.Rngs(0))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, 9)))
    full = m(ids)
    cache = m.init_cache(2, 12)
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    h1, cache = m.forward_cached(ids[:, :6], pos, cache)
    outs = [m.logits(h1)]
    for t in range(6, 9):  # one-token decode
        h, cache = m.forward_cached(ids[:, t:t + 1], jnp.full((2, 1), t), cache)
        outs.append(m.logits(h))
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-5)


def test_decode_over_shared_prefix_rows_equals_full_forward():
    """Rows whose prompts are (prefixes of) two sources held once in shared prefix rows, decoding
    into their own short caches, give the logits of the uncached full forward of each row's tokens."""
    cfg = Qwen2Config.preset("tiny", vocab_size=50)
    graphdef, params = nnx.split(Qwen2ForCausalLM(cfg, nnx.Rngs(0)))

    @jax.jit
    def decode(params, sources, src, lens, new):
        m = nnx.merge(graphdef, params)
        _, prefix = m.forward_cached(sources, jnp.broadcast_to(jnp.arange(10), (2, 10)), m.init_cache(2, 10))
        own, out = m.init_cache(4, 5), []
        for t in range(new.shape[1]):
            h, own = m.forward_cached(new[:, t:t + 1], (lens + t)[:, None], own, SharedPrefix(prefix, src, lens))
            out.append(m.logits(h[:, 0]))
        return jnp.stack(out, axis=1)

    rs = np.random.RandomState(1)
    sources = rs.randint(0, 50, (2, 10))
    src, lens = np.array([0, 1, 0, 1]), np.array([10, 4, 7, 9])  # rows read 10/4/7/9 positions of their source
    new = rs.randint(0, 50, (4, 3))
    got = decode(params, sources, src, lens, new)
    seqs = np.zeros((4, 13), np.int32)  # each row's tokens, right-padded, for one full forward
    for b in range(4):
        seqs[b, :lens[b] + 3] = np.concatenate([sources[src[b], :lens[b]], new[b]])
    full = nnx.merge(graphdef, params)(seqs, np.arange(13)[None] < (lens + 3)[:, None])
    want = np.stack([full[b, lens[b]:lens[b] + 3] for b in range(4)])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_bf16_dot_accumulates_in_f32_and_rounds_once():
    """linear.dot on bf16 operands = the f32 product of the same values (numpy), rounded to bf16 once."""
    from prm_jax.models.linear import dot

    rs = np.random.RandomState(0)
    a, b = (jnp.asarray(rs.randn(*s), jnp.bfloat16) for s in ((3, 5, 256), (256, 7)))
    want = np.einsum("btk,kn->btn", np.asarray(a, np.float32), np.asarray(b, np.float32))
    got = dot("btk,kn->btn", a, b)
    assert got.dtype == jnp.bfloat16
    # within half a bf16 ulp of the f32 product (plus f32 summation-order noise), where rounding a
    # bf16-accumulated sum over 256 terms would be off by several ulps
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2 ** -8 + 1e-5, atol=1e-5)


def test_bf16_cached_decode_keeps_an_exact_f32_cache_and_follows_the_full_forward():
    """In bf16 the KV cache is f32 on CPU (qwen2.cache_dtype) holding the bf16 keys exactly; decoding
    through it gives the full bf16 forward's logits within bf16 noise, and both stay near f32's."""
    from prm_jax.models.qwen2 import cache_dtype

    cfg = Qwen2Config.preset("tiny", vocab_size=50)
    m32 = Qwen2ForCausalLM(cfg, nnx.Rngs(0))
    cfg16 = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    m16 = nnx.merge(nnx.split(Qwen2ForCausalLM(cfg16, nnx.Rngs(0)))[0],
                    jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(m32)))
    assert cache_dtype(cfg16) == jnp.float32
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 50, (2, 9)))
    full16, full32 = m16(ids).astype(jnp.float32), m32(ids)
    cache = m16.init_cache(2, 12)
    h, cache = m16.forward_cached(ids[:, :6], jnp.broadcast_to(jnp.arange(6), (2, 6)), cache)
    assert cache[0][0].dtype == jnp.float32
    np.testing.assert_array_equal(cache[0][0], cache[0][0].astype(jnp.bfloat16).astype(jnp.float32))
    outs = [m16.logits(h)]
    for t in range(6, 9):
        h, cache = m16.forward_cached(ids[:, t:t + 1], jnp.full((2, 1), t), cache)
        outs.append(m16.logits(h))
    cached16 = np.concatenate(outs, axis=1).astype(np.float32)
    scale = float(np.abs(full32).max())
    assert np.abs(cached16 - full16).max() < 0.02 * scale
    assert np.abs(cached16 - full32).max() < 0.02 * scale


def test_step_rewards_read_p_correct_at_step_tokens():
    from prm_jax.models.prm import step_rewards

    logits = np.zeros((1, 4, 2), np.float32)
    logits[0, 1] = [0.0, np.log(3.0)]  # P(class 1) = 3 / 4
    logits[0, 3] = [np.log(4.0), 0.0]  # P(class 1) = 1 / 5
    assert np.allclose(step_rewards(logits, np.array([[5, 9, 5, 9]]), step_token_id=9), [[0.75, 0.2]])


def _numpy_attention(q, k, v, seg):
    """Reference written out: softmax(q k^T / sqrt(d)) v per head, a query seeing keys at or before it
    in its own segment; kv head j serves query heads j*G .. j*G+G-1."""
    b, t, h, d = q.shape
    g = h // k.shape[2]
    out = np.zeros_like(q)
    for r in range(b):
        for i in range(t):
            seen = [j for j in range(i + 1) if seg[r, j] == seg[r, i]]
            for hh in range(h):
                s = np.array([q[r, i, hh] @ k[r, j, hh // g] for j in seen]) / np.sqrt(d)
                w = np.exp(s - s.max())
                out[r, i, hh] = (w / w.sum()) @ v[r, seen, hh // g]
    return out


def test_flash_attention_is_causal_with_segment_bias():
    """The cuDNN path's masking (causality from the kernel's flag, the segment mask as a bias), run
    through jax's XLA implementation of the same call, against attention written out in numpy."""
    from prm_jax.models.attention import flash_attention
    from prm_jax.models.qwen2 import full_mask

    rng = np.random.default_rng(0)
    b, t, h, kv, d = 2, 10, 4, 2, 8
    q = rng.standard_normal((b, t, h, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, t, kv, d)).astype(np.float32) for _ in range(2))
    packed = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 2, 2, 2, 2, 2]])
    got = flash_attention(q, k, v, full_mask(None, jnp.asarray(packed), b, t, causal=False), implementation="xla")
    real = packed > 0
    np.testing.assert_allclose(np.asarray(got)[real], _numpy_attention(q, k, v, packed)[real], atol=1e-5)
    one_sequence = np.ones_like(packed)
    got = flash_attention(q, k, v, None, implementation="xla")
    np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k, v, one_sequence), atol=1e-5)


def test_remat_keeping_matmuls_gives_the_same_gradients():
    import jax

    from prm_jax.models.qwen2 import REMAT_POLICIES
    from prm_jax.models.runtime import REMAT_SAVES
    assert set(REMAT_POLICIES) == set(REMAT_SAVES)  # every accepted remat_saves has a policy
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 50, (2, 7)))
    grads = []
    for kw in ({}, {"remat": True, "remat_saves": "matmuls"}, {"remat": True}):
        graphdef, params = nnx.split(Qwen2ForCausalLM(Qwen2Config.preset("tiny", vocab_size=50, **kw), nnx.Rngs(0)))
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(ids) ** 2)  # noqa: E731
        grads.append(jax.tree.leaves(jax.jit(jax.grad(loss))(params)))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_auto_attention_picks_cudnn_only_on_nvidia_gpus_in_half_precision(monkeypatch):
    import jax

    class FakeDevice:
        device_kind = "NVIDIA H100 80GB HBM3"

    assert not Qwen2Config.preset("tiny", attention_impl="auto", dtype="bfloat16").flash  # this CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *a: [FakeDevice()])
    assert Qwen2Config.preset("tiny", attention_impl="auto", dtype="bfloat16").flash
    assert not Qwen2Config.preset("tiny", attention_impl="auto", dtype="float32").flash  # cuDNN flash needs bf16/fp16
    assert Qwen2Config.preset("tiny", attention_impl="cudnn", dtype="float32").flash  # explicit choice stands
    FakeDevice.device_kind = "AMD Instinct MI300X"
    assert not Qwen2Config.preset("tiny", attention_impl="auto", dtype="bfloat16").flash


def test_prm_logits_and_gradients_at_score_positions_equal_the_full_forward():
    """Reading the PRM only at score positions (its last layer then runs queries and MLP there alone)
    must give the full forward's logits at those positions, and the same gradients for a loss on them."""
    import jax

    from prm_jax.models.prm import Qwen2PRM

    ids = jnp.asarray(np.random.RandomState(2).randint(0, 50, (2, 12)))
    seg = jnp.asarray([[1] * 5 + [2] * 5 + [0] * 2, [1] * 12])
    idx = jnp.asarray([[0, 4, 7, 9], [3, 5, 11, 0]])
    for kw in ({}, {"remat": True}):
        graphdef, params = nnx.split(Qwen2PRM(Qwen2Config.preset("tiny", vocab_size=50, **kw), nnx.Rngs(0)))

        def full(p):
            return jnp.take_along_axis(nnx.merge(graphdef, p)(ids, segment_ids=seg), idx[..., None], axis=1)

        def pruned(p):
            return nnx.merge(graphdef, p)(ids, segment_ids=seg, score_positions=idx)

        np.testing.assert_allclose(jax.jit(pruned)(params), jax.jit(full)(params), atol=1e-6)
        g_full, g_pruned = (jax.jit(jax.grad(lambda p, f=f: jnp.sum(jnp.sin(f(p)))))(params) for f in (full, pruned))
        for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_pruned)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
