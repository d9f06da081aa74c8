"""The JAX sampler against independent references: transformers' greedy generate, the model's own
full (uncached) forward pass with the top-k / top-p support computed in numpy, and the exact
nucleus distribution for the token-selection kernels."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from prm_jax.buckets import size_bucket
from prm_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from prm_jax.parallel.mesh import make_mesh, state_shardings
from prm_jax.sampling import sampler, select

VOCAB = 128
CFG = Qwen2Config.preset("tiny", vocab_size=VOCAB)


def _perturbed_model(seed: int = 0, head_scale: float = 6.0) -> Qwen2ForCausalLM:
    """Tiny model with every parameter random (biases and norm scales too); the LM head is scaled
    up so next-token distributions are peaked enough for top-p to cut a visible tail."""
    model = Qwen2ForCausalLM(CFG, nnx.Rngs(seed))
    rs = np.random.RandomState(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = var[...].shape
        if path[-1] == "scale":
            var[...] = jnp.asarray(1 + 0.1 * rs.randn(*shape), jnp.float32)
        elif path[-1] == "bias":
            var[...] = jnp.asarray(0.1 * rs.randn(*shape), jnp.float32)
        elif path[0] == "lm_head":
            var[...] = var[...] * head_scale
    return model


def _to_transformers(model):
    from transformers import Qwen2Config as HFConfig, Qwen2ForCausalLM as HFModel

    hf = HFModel(HFConfig(**model.cfg.to_hf())).eval().float()
    sd = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, leaf = ".".join(str(p) for p in path[:-1]), path[-1]
        w = np.array(var[...], np.float32)
        sd[f"{name}.{'bias' if leaf == 'bias' else 'weight'}"] = torch.from_numpy(w.T.copy() if leaf == "kernel" else w)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not [k for k in missing if "rotary" not in k] and not unexpected, (missing, unexpected)
    return hf


def _full_logits(model, seqs):
    """Uncached full forward of every sequence (one right-padded batch, one jit): [N, T, V]."""
    width = max(map(len, seqs))
    ids = np.array([s + [0] * (width - len(s)) for s in seqs])
    mask = np.array([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, m))(state, ids, mask))


def _sharded(model, mesh):
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))


@pytest.fixture(scope="module")
def model():
    return _perturbed_model()


@pytest.fixture(scope="module")
def prompts():
    rs = np.random.RandomState(1)
    return [rs.randint(0, VOCAB, n).tolist() for n in (5, 11, 3, 8, 14)]


def test_greedy_matches_transformers_ragged(model, prompts):
    new = 12
    ours = sampler.generate(model, prompts, new)
    hf = _to_transformers(model)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding for HF
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                          min_new_tokens=new, eos_token_id=None, pad_token_id=0)
    assert ours == out[:, width:].tolist()


def test_stop_ids_end_rows_inclusive(model, prompts):
    free = sampler.generate(model, prompts, 12)
    stop = free[1][4]  # a token that some row emits mid-way
    stopped = sampler.generate(model, prompts, 12, stop_ids=[stop, VOCAB - 1])
    for row, got in zip(free, stopped):
        cut = [i for i, t in enumerate(row) if t in (stop, VOCAB - 1)]
        assert got == (row[:cut[0] + 1] if cut else row)
    assert len(stopped[1]) == 5


def test_seed_reproduces_across_meshes_and_batches(model, prompts):
    kw = dict(temperature=1.0, top_p=0.9, seed=7)
    ref = sampler.generate(model, prompts, 10, **kw)
    assert sampler.generate(model, prompts, 10, **kw) == ref
    assert sampler.generate(model, prompts, 10, **{**kw, "seed": 8}) != ref
    # another batch composition: a subset in reverse order (keeping each prompt's key id), and
    # the same prompts decoded two rows at a time
    rev = list(range(len(prompts)))[::-1]  # reordered, plus a newcomer row (key id 99)
    mixed = sampler.generate(model, [prompts[i] for i in rev] + [[1, 2, 3]], 10, key_ids=rev + [99], **kw)
    assert mixed[:-1] == [ref[i] for i in rev]
    mesh = make_mesh((8, 1, 1))  # the sampler places an unsharded model by the mesh rules itself
    assert sampler.generate(model, prompts, 10, mesh=mesh, **kw) == ref
    mesh = make_mesh((2, 2, 2))  # weights split over fsdp and tensor, rows over data x fsdp
    assert sampler.generate(_sharded(model, mesh), prompts, 10, mesh=mesh, **kw) == ref


def _support_ok(logits: np.ndarray, token: int, temperature: float, top_k: int, top_p: float) -> bool:
    """Is `token` inside the top-k / top-p support of these logits (transformers' definition:
    top-k first, then keep x iff the mass of the strictly more likely kept tokens is < top_p)?
    Computed in float64 with a small margin for the cached vs full forward rounding."""
    z = logits.astype(np.float64) / temperature
    if top_k:
        kth = np.sort(z)[-top_k]
        if z[token] < kth - 1e-5:
            return False
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    above = p[p > p[token] * (1 + 1e-5)].sum()
    return above < top_p + 1e-5


@pytest.mark.parametrize("top_k,top_p", [(0, 0.6), (5, 0.9)])
def test_top_k_top_p_stay_inside_support(model, prompts, top_k, top_p):
    temperature = 0.9
    outs = sampler.generate(model, prompts, 10, temperature=temperature, top_p=top_p, top_k=top_k, seed=3)
    sizes = []
    full = _full_logits(model, [p + o for p, o in zip(prompts, outs)])
    for prompt, out, logits in zip(prompts, outs, full):
        for i, tok in enumerate(out):
            row = logits[len(prompt) - 1 + i]
            assert _support_ok(row, tok, temperature, top_k, top_p), (top_k, top_p, i)
            sizes.append(sum(_support_ok(row, t, temperature, top_k, top_p) for t in range(VOCAB)))
    assert min(sizes) < VOCAB // 2  # the restriction actually bites on this model


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    above = np.array([probs[probs > q].sum() for q in probs])
    kept = np.where(above < top_p, probs, 0.0)
    return kept / kept.sum()


@pytest.mark.parametrize("rounds", [select.ROUNDS, 0])  # 0: every row takes the bisection fallback
def test_top_p_kernel_samples_the_exact_nucleus(monkeypatch, rounds):
    monkeypatch.setattr(select, "ROUNDS", rounds)
    v, n, top_p = 40, 6000, 0.55
    logits = np.random.RandomState(0).randn(v).astype(np.float32) * 1.5
    keys = jax.random.split(jax.random.key(11), n)
    strategy = select.Strategy(greedy=False, use_top_p=True)
    toks = jax.jit(lambda lg, k: select.choose(lg, k, jnp.float32(1.0), jnp.float32(top_p), strategy))(
        jnp.broadcast_to(jnp.asarray(logits), (n, v)), keys)
    p = np.exp(logits - logits.max())
    want = _nucleus(p / p.sum(), top_p)
    freq = np.bincount(np.asarray(toks), minlength=v) / n
    assert np.all(freq[want == 0] == 0)
    np.testing.assert_allclose(freq, want, atol=4 * np.sqrt(want.max() / n))


def test_temperature_and_top_k_kernels_sample_exactly():
    v, n = 300, 6000  # 300 > one 128-token block: both CDF levels are used
    logits = np.random.RandomState(2).randn(v).astype(np.float32)
    keys = jax.random.split(jax.random.key(5), n)
    lg = jnp.broadcast_to(jnp.asarray(logits), (n, v))
    for strategy, temperature in ((select.Strategy(greedy=False), 0.7), (select.Strategy(greedy=False, top_k=7), 1.3)):
        toks = jax.jit(lambda lg, k: select.choose(lg, k, jnp.float32(temperature), jnp.float32(1.0), strategy))(lg, keys)
        z = logits / temperature
        if strategy.top_k:
            z = np.where(z >= np.sort(z)[-strategy.top_k], z, -np.inf)
        want = np.exp(z - z.max())
        want /= want.sum()
        freq = np.bincount(np.asarray(toks), minlength=v) / n
        assert np.all(freq[want == 0] == 0)
        np.testing.assert_allclose(freq, want, atol=4 * np.sqrt(want.max() / n))


def test_argmax_and_threshold_kernels():
    x = np.random.RandomState(3).randn(4, 300).astype(np.float32)
    x[1, [7, 290]] = 9.0  # tie: the lower index wins, like np.argmax
    np.testing.assert_array_equal(select.argmax_first(jnp.asarray(x)), np.argmax(x, axis=-1))
    w = np.exp(x - x.max(-1, keepdims=True))
    tau = np.asarray(select.nucleus_threshold(jnp.asarray(w), jnp.asarray(0.6 * w.sum(-1))))
    for row, t in zip(w, tau):
        kept = _nucleus(row / row.sum(), 0.6) > 0
        assert np.array_equal(row >= t, kept)


def test_shared_prefix_rollouts_equal_independent_rollouts(model):
    rs = np.random.RandomState(4)
    solution = rs.randint(0, VOCAB, 20).tolist()
    other = rs.randint(0, VOCAB, 6).tolist()
    prefixes = [solution[:6], solution[:13], solution, other, solution[:13]]
    assert len(sampler.share_sources(prefixes)[0]) == 2  # one prefill per solution
    n, kw = 3, dict(temperature=1.0, top_p=0.9, seed=5, stop_ids=[3], return_logprobs=True)
    shared, shared_lp = sampler.generate_from_prefixes(model, prefixes, n, 9, **kw)
    flat = [p for p in prefixes for _ in range(n)]
    indep, indep_lp = sampler.generate(model, flat, 9, key_ids=[i for i in range(len(prefixes)) for _ in range(n)],
                                       sample_ids=list(range(n)) * len(prefixes), **kw)
    assert [row for group in shared for row in group] == indep
    np.testing.assert_allclose(np.concatenate([x for g in shared_lp for x in g]), np.concatenate(indep_lp), atol=1e-5)
    assert shared[1][0] != shared[1][1]  # the n samples differ
    # log-probs are the model's own log-softmax at each new token (full forward reference)
    seq = prefixes[2] + shared[2][0]
    ref = jax.nn.log_softmax(_full_logits(model, [seq])[0], axis=-1)
    want = [float(ref[len(prefixes[2]) - 1 + i, t]) for i, t in enumerate(shared[2][0])]
    np.testing.assert_allclose(shared_lp[2][0], want, atol=1e-4)


def test_compile_count_stays_bounded(model):
    rs = np.random.RandomState(6)
    before = sampler.compile_count()
    for size in (5, 6, 7, 8, 7, 5):  # batch buckets 6 and 8; prompt lengths all in bucket 16
        sampler.generate(model, [rs.randint(0, VOCAB, rs.randint(2, 17)).tolist() for _ in range(size)], 12)
    assert sampler.compile_count() - before <= 4  # 2 batch buckets x (prefill + decode), not 6 x 2
    # a call's short last batch (4 rows of 1 source, after 12 rows of 3) is padded to the first
    # batch's shapes: one prefill and one decode program, and its rows are those sampled alone
    prompts = [rs.randint(0, VOCAB, 9).tolist() for _ in range(4)]
    before = sampler.compile_count()
    outs = sampler.generate_from_prefixes(model, prompts, 4, 10, temperature=1.0, seed=3, max_batch=12,
                                          batching="static")
    assert sampler.compile_count() - before <= 2, sampler.compile_log()[before:]  # 4 when each batch had its own
    # continuous batching: a repeated call of the same shapes compiles nothing new
    sampler.generate_from_prefixes(model, prompts, 4, 10, temperature=1.0, seed=3, max_batch=12)
    before = sampler.compile_count()
    sampler.generate_from_prefixes(model, prompts, 4, 10, temperature=1.0, seed=4, max_batch=12)
    assert sampler.compile_count() == before, sampler.compile_log()[before:]
    alone = sampler.generate(model, prompts[3:] * 4, 10, temperature=1.0, seed=3, key_ids=[3] * 4,
                             sample_ids=range(4), batching="static")
    assert outs[3] == alone
    assert len(sampler.compile_log()) == sampler.compile_count()


def test_bad_input_is_reported(model):
    with pytest.raises(ValueError, match=r"prompts\[1\]: empty"):
        sampler.generate(model, [[1], []], 2)
    with pytest.raises(ValueError, match=r"prompts\[0\]: token id 999"):
        sampler.generate(model, [[999]], 2)
    with pytest.raises(ValueError, match="top_p"):
        sampler.generate(model, [[1]], 2, temperature=1.0, top_p=0.0)


# -- continuous batching -----------------------------------------------------------------------------

def _counting_model(vocab: int = 64) -> Qwen2ForCausalLM:
    """A model whose greedy next token is (last token + 1) mod vocab, whatever came before: every
    layer's output projections are zero (the residual stream stays the token's embedding), the
    embedding is the identity and the LM head a cyclic shift. With stop id 0, a row whose prompt
    ends with x therefore returns [x+1, ..., vocab-1, 0]: a known length, vocab - x."""
    cfg = Qwen2Config.preset("tiny", vocab_size=vocab, hidden_size=vocab)
    model = Qwen2ForCausalLM(cfg, nnx.Rngs(0))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-2] in ("o_proj", "down_proj"):
            var[...] = jnp.zeros_like(var[...])
    model.model.embed_tokens.embedding[...] = jnp.eye(vocab, dtype=jnp.float32)
    model.lm_head.kernel[...] = jnp.roll(jnp.eye(vocab, dtype=jnp.float32), 1, axis=1) * 10.0
    return model


def test_continuous_reuses_slots_and_answers_every_request_once(monkeypatch):
    monkeypatch.setattr(sampler, "MIN_SLOTS", 1)  # the draining pool is compacted 4 -> 2 -> 1
    vocab = 64
    model = _counting_model(vocab)
    rs = np.random.RandomState(7)
    lasts = [60, 20, 63, 45, 58, 33, 61, 50, 40, 62, 55, 47, 30]  # lengths 4 .. 44 tokens
    prompts = [rs.randint(1, vocab, rs.randint(1, 9)).tolist() + [x] for x in lasts]
    want = [list(range(x + 1, vocab)) + [0] for x in lasts]
    outs = sampler.generate(model, prompts, 48, stop_ids=[0], max_batch=4)
    assert outs == want  # every request answered, with its own tokens (none lost, none swapped)
    cont = sampler.last_stats()
    assert cont.kept_tokens == sum(map(len, want))
    # 13 requests through 4 slots: the pool ran fewer steps than the rows' total length, and far
    # fewer than 4-row static batches, which each wait for their longest row
    assert cont.decode_steps < sum(map(len, want)) / 2
    assert sampler.generate(model, prompts, 48, stop_ids=[0], max_batch=4, batching="static") == want
    static = sampler.last_stats()
    assert cont.slot_steps < static.slot_steps and cont.utilisation > static.utilisation
    # prefixes with uneven counts: each row is its prefix's count, answered once
    grouped = sampler.generate_from_prefixes(model, prompts[:3], [3, 1, 5], 48, stop_ids=[0], max_batch=4)
    assert grouped == [[want[0]] * 3, [want[1]], [want[2]] * 5]


def test_continuous_equals_static(model, prompts):
    rs = np.random.RandomState(8)
    many = prompts + [rs.randint(0, VOCAB, n).tolist() for n in (2, 17, 9, 4, 12, 6, 21)]
    stops = [3, 17, 40, 77, 101]  # rows end at different steps, so slots free up mid-run
    for kw in (dict(), dict(temperature=1.0, top_p=0.9, seed=11), dict(temperature=0.8, top_k=6, seed=2)):
        ref, ref_lp = sampler.generate(model, many, 24, stop_ids=stops, return_logprobs=True, batching="static", **kw)
        got, got_lp = sampler.generate(model, many, 24, stop_ids=stops, return_logprobs=True, max_batch=4, **kw)
        assert got == ref, kw
        np.testing.assert_allclose(np.concatenate(got_lp), np.concatenate(ref_lp), atol=1e-5)
        assert len({len(r) for r in ref}) > 3  # lengths really differ
    # shared prefixes through a pool smaller than the request count
    prefixes = [many[8][:k] for k in (3, 9, 17)] + [many[1]]
    kw = dict(temperature=1.0, top_p=0.9, seed=5, stop_ids=stops)
    assert (sampler.generate_from_prefixes(model, prefixes, 3, 20, max_batch=4, **kw)
            == sampler.generate_from_prefixes(model, prefixes, 3, 20, batching="static", **kw))


def test_shared_prefix_rows_serve_more_sources_than_they_hold(model, monkeypatch):
    """Sources with many rows each keep their prompts once, in fewer shared prefix rows than there
    are sources: a row waits for a prefix row, each source is prefilled once, every request is
    answered once with its known tokens, and sampled rows equal the static path's."""
    vocab = 64
    counting = _counting_model(vocab)
    rs = np.random.RandomState(12)
    lasts = [60, 20, 45]
    prompts = [rs.randint(1, vocab, rs.randint(3, 12)).tolist() + [x] for x in lasts]
    before = len(sampler.compile_log())
    outs = sampler.generate_from_prefixes(counting, prompts, 8, 48, stop_ids=[0], max_batch=8)
    assert outs == [[list(range(x + 1, vocab)) + [0]] * 8 for x in lasts]
    admits = [ln for ln in sampler.compile_log()[before:] if ln.startswith("admit")]
    assert admits and all("admit_shared" in ln and "prefix_rows=2" in ln for ln in admits), admits
    assert sampler.last_stats().prefill_tokens == sum(map(len, prompts))  # 3 sources through 2 rows, once each
    # a real model: 3 sources through 2 prefix rows give the static path's samples
    many = [rs.randint(0, VOCAB, n).tolist() for n in (7, 19, 12)]
    kw = dict(temperature=1.0, top_p=0.9, seed=7, stop_ids=[3, 17, 40])
    rows = []
    real = sampler._admit_shared
    monkeypatch.setattr(sampler, "_admit_shared", lambda *a, **k: rows.append(a[3]["hidden"].shape[0]) or real(*a, **k))
    got = sampler.generate_from_prefixes(model, many, 5, 20, max_batch=4, **kw)
    assert rows and set(rows) == {2}
    assert got == sampler.generate_from_prefixes(model, many, 5, 20, batching="static", **kw)


def test_bounded_cache_decode_equals_full_cache(model, monkeypatch):
    """Small cache buckets and chunks make the pool grow, shrink and compact its cache while long
    and short rows decode together; greedy tokens equal the static path's, whose cache is
    preallocated for prompt + max_new_tokens and read whole at every step."""
    monkeypatch.setattr(sampler, "_CACHE_QUANTUM", 8)
    monkeypatch.setattr(sampler, "CHUNK_STEPS", 4)
    monkeypatch.setattr(sampler, "MIN_SLOTS", 2)
    rs = np.random.RandomState(9)
    mixed = [rs.randint(0, VOCAB, n).tolist() for n in (3, 70, 5, 41, 2, 66, 9, 30)]
    stops = [3, 17, 40]
    ref = sampler.generate(model, mixed, 40, stop_ids=stops, batching="static")
    before = len(sampler.compile_log())
    got = sampler.generate(model, mixed, 40, stop_ids=stops)
    assert got == ref
    lengths = {line.split("cache=")[1].split()[0].split("->")[1] for line in sampler.compile_log()[before:]
               if "resize" in line}
    assert len(lengths) >= 2, sampler.compile_log()[before:]  # the cache length really moved
    full = size_bucket(70, 16) + size_bucket(40, 8)  # the static path's cache length
    assert min(int(x) for x in lengths) < full


def test_continuous_batching_is_rejected_with_a_clear_error(model):
    with pytest.raises(ValueError, match="batching must be 'continuous' or 'static'"):
        sampler.generate(model, [[1, 2]], 2, batching="paged")


def test_decode_chunk_updates_the_cache_in_place(model, monkeypatch):
    """The compiled decode chunk copies no cache-shaped buffer (a copy of the whole cache at every
    step cost 15-20% of the step on the benchmark; which lax.cond branch is the pass-through decides it)."""
    seen = {}
    real = sampler._chunk

    def spy(*args, **kw):
        seen["hlo"] = real.lower(*args, **kw).compile().as_text()
        return real(*args, **kw)
    monkeypatch.setattr(sampler, "_chunk", spy)
    sampler.generate(model, [[1, 2, 3]] * 8, 6, temperature=0.7, top_p=0.8, seed=1)
    shape = f"f32[8,{CFG.num_kv_heads},"
    copies = [ln for ln in seen["hlo"].splitlines() if f"= {shape}" in ln and " copy(" in ln]
    assert not copies, copies[:2]


def test_kept_caches_extend_rows_without_prefilling_them(model, prompts, monkeypatch):
    """Rows extended from their kept KV caches (return_cache, then reuse=) sample exactly what the
    same prefixes sampled from scratch do, and only each row's last token is prefilled again."""
    monkeypatch.setattr(sampler, "_CACHE_QUANTUM", 8)  # the pool's cache (and the kept buffer) grow
    monkeypatch.setattr(sampler, "CHUNK_STEPS", 4)
    kw = dict(temperature=1.0, top_p=0.9, seed=5, stop_ids=[3, 17, 40])
    # a pool of 4 slots for 10 rows: caches are kept as rows finish, across refills and resizes
    before = len(sampler.compile_log())
    first, kept = sampler.generate_from_prefixes(model, prompts, 2, 10, return_cache=True, max_batch=4, **kw)
    assert any(line.startswith("grow") for line in sampler.compile_log()[before:])
    ext = [p + r for p, rows in zip(prompts, first) for r in rows]
    assert kept.tokens == tuple(map(tuple, ext)) and kept.valid == tuple(len(x) - 1 for x in ext)
    # extended rows, a shorter prefix of one (it reads part of its cache), and a new prompt (prefilled whole)
    cut = len(prompts[1]) + 2
    assert cut < len(ext[2]) and len(set(map(tuple, ext))) == len(ext)
    asks = ext + [ext[2][:cut], [5, 6, 7]]
    ref, ref_lp = sampler.generate_from_prefixes(model, asks, 2, 10, return_logprobs=True, **kw)
    assert sampler.last_stats().prefill_tokens == sum(map(len, ext)) + 3  # ext[2][:cut] shares ext[2]'s prefill
    got, got_lp, again = sampler.generate_from_prefixes(model, asks, 2, 10, return_logprobs=True, reuse=kept,
                                                        return_cache=True, **kw)
    assert got == ref
    np.testing.assert_allclose(np.concatenate([x for g in got_lp for x in g]),
                               np.concatenate([x for g in ref_lp for x in g]), atol=1e-5)
    # one token per extended row, ext[2] from position cut - 1 (for its short reader), the new prompt whole
    assert sampler.last_stats().prefill_tokens == len(ext) - 1 + (len(ext[2]) - cut + 1) + 3
    assert again.tokens[0] == tuple(ext[0] + got[0][0]) and again.valid[0] == len(ext[0]) + len(got[0][0]) - 1
    with pytest.raises(ValueError, match="need batching='continuous'"):
        sampler.generate_from_prefixes(model, asks, 2, 10, reuse=kept, batching="static")
