"""What only a GPU can show: MFU of our PRM train step on a Qwen2-1.5B-shaped PRM in bf16, and
the sampler's decode speed next to transformers `generate` on the same GPU, same run.

    python experiments/gpu_check.py [--parts train,sample] [--seq 2048] [--preset qwen2_5_1_5b]
                                    [--variants causal/off/8,causal/matmuls/8,...]

A train variant is attention/remat/batch: attention `causal` (cuDNN flash attention, causal mask
in the kernel, rows unpacked: no bias), `packed` (the same with packed rows: the segment mask goes in
as a [B,T,T] bias) or `xla` (plain XLA attention); remat `off`, `full` (keep only each layer's
input) or `matmuls` (keep every matmul's output, recompute only elementwise work); batch rows.
Random weights (speed does not depend on them), made leaf by leaf by one small compiled program per
distinct shape (a single jitted init of the whole 1.5B model took 5.5 min to compile on an H200);
compile time is excluded and printed apart. Every variant runs; one that fails (e.g. out of memory
without remat) is reported and the rest go on.
MFU uses the trainer's FLOP formula (prm_jax.training.metrics.train_flops_per_token) and the
device's dense bf16 peak (prm_jax.training.metrics.PEAK_FLOPS).
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def quick_params(abs_params: dict, shardings: dict) -> dict:
    """Norm scales 1, biases 0, matrices N(0, 0.02): one compiled program per (shape, sharding)."""
    @functools.lru_cache(maxsize=None)
    def maker(shape, dtype, sharding, kind):
        if kind == "normal":
            return jax.jit(lambda key: (0.02 * jax.random.normal(key, shape)).astype(dtype), out_shardings=sharding)
        return jax.jit(lambda key: jnp.full(shape, 1.0 if kind == "ones" else 0.0, dtype), out_shardings=sharding)

    leaves, treedef = jax.tree_util.tree_flatten_with_path(abs_params)
    sh_leaves = jax.tree.leaves(shardings)
    out = []
    for i, ((path, a), sh) in enumerate(zip(leaves, sh_leaves)):
        name = jax.tree_util.keystr(path)
        kind = "ones" if "norm" in name else ("zeros" if "bias" in name or a.ndim == 1 else "normal")
        out.append(maker(a.shape, a.dtype, sh, kind)(jax.random.key(i)))
    return jax.tree.unflatten(treedef, out)


def train_mfu(variant: str, seq: int, preset: str, steps: int = 6) -> None:
    from prm_jax.models.prm import Qwen2PRM
    from prm_jax.models.qwen2 import Qwen2Config
    from prm_jax.parallel import mesh as pmesh
    from prm_jax.training import metrics as tm
    from prm_jax.training import step as ts
    from prm_jax.training.config import TrainConfig

    attn, remat, batch = variant.split("/")
    batch = int(batch)
    cfg = Qwen2Config.preset(
        preset, param_dtype="float32", dtype="bfloat16", attention_impl="xla" if attn == "xla" else "cudnn",
        remat=remat != "off", remat_saves="matmuls" if remat == "matmuls" else "nothing")
    mesh = pmesh.make_mesh(None)
    abstract = nnx.eval_shape(lambda: Qwen2PRM(cfg, nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    param_sh = nnx.to_pure_dict(pmesh.state_shardings(abs_state, mesh))
    t0 = time.perf_counter()
    params = quick_params(nnx.to_pure_dict(abs_state), param_sh)
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t0
    tx = ts.make_optimizer(TrainConfig())
    opt_sh, _ = ts.opt_state_shardings(tx, jax.eval_shape(lambda: params), param_sh, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    step = ts.make_train_step(graphdef, "prm", tx, mesh, param_sh, opt_sh, packed=attn == "packed")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (1, batch, seq), dtype=np.int32)
    labels = np.full((1, batch, seq), -100, np.int32)
    labels[:, :, 63::64] = rng.integers(0, 2, labels[:, :, 63::64].shape)  # a step token every 64 tokens
    b = {"input_ids": ids, "labels": labels, "segment_ids": np.ones_like(ids),
         "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape).copy()}
    b = jax.device_put(b, ts.batch_sharding(mesh))
    t0 = time.perf_counter()
    params, opt_state, m = step(params, opt_state, b)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        params, opt_state, m = step(params, opt_state, b)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    tokens = batch * seq
    flops = tm.train_flops_per_token(cfg, "prm", seq) * tokens
    peak = tm.peak_flops_per_device(jax.devices()[0].device_kind) or float("nan")
    mfu = flops / dt / peak
    mem = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", float("nan")) / 2**30
    print(f"train PRM {preset} shape, bf16 compute / f32 master, attention={attn}, remat={remat}, "
          f"batch {batch}x{seq}: {dt * 1e3:.0f} ms/step (median of {steps}), peak mem {mem:.1f} GiB, "
          f"{tokens / dt:,.0f} tokens/s, MFU {100 * mfu:.1f}% of {peak / 1e12:.0f} TFLOP/s, "
          f"loss {float(m['loss']):.3f}, init {init_s:.0f} s, compile {compile_s:.0f} s", flush=True)
    del params, opt_state


def flash_attention_check() -> None:
    """cuDNN flash attention against the plain attention, on packed rows with padding, bf16."""
    from prm_jax.models.attention import attention, flash_attention
    from prm_jax.models.qwen2 import full_mask

    b, t, h, kv, d = 2, 512, 12, 2, 128
    kq, kk, kv_ = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (b, t, h, d), jnp.bfloat16)
    k = jax.random.normal(kk, (b, t, kv, d), jnp.bfloat16)
    v = jax.random.normal(kv_, (b, t, kv, d), jnp.bfloat16)
    seg = jnp.asarray(np.repeat([[1, 2, 3, 0]], t // 4, axis=1).repeat(b, 0))  # three packed + padding
    real = (seg > 0)[..., None, None]
    for name, segments in (("packed", seg), ("causal only", None)):
        want = attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), full_mask(None, segments, b, t))
        got = flash_attention(q, k, v, None if segments is None else full_mask(None, segments, b, t, causal=False))
        err = float(jnp.max(jnp.where(real, jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)), 0)))
        print(f"flash attention (cuDNN) vs plain attention, {name}, bf16: max abs diff {err:.4f}", flush=True)


def sampler_vs_hf(batch: int, prompt_len: int, new_tokens: int) -> None:
    import torch
    import transformers

    from prm_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
    from prm_jax.sampling.sampler import generate

    cfg = Qwen2Config.preset("qwen2_5_1_5b", param_dtype="bfloat16", dtype="bfloat16")
    model = Qwen2ForCausalLM(cfg, nnx.Rngs(0))
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(0, cfg.vocab_size, prompt_len))) for _ in range(batch)]
    kw = dict(max_new_tokens=new_tokens, temperature=0.7, top_p=0.8, seed=0, stop_ids=[])
    t0 = time.perf_counter()
    generate(model, prompts, **kw)
    compile_s = time.perf_counter() - t0
    ours = []
    for r in range(3):
        t0 = time.perf_counter()
        out = generate(model, prompts, **{**kw, "seed": r + 1})
        ours.append(time.perf_counter() - t0)
    n_tok = sum(len(o) for o in out)
    ours_tps = n_tok / statistics.median(ours)
    del model

    hf_cfg = transformers.Qwen2Config(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "torch_dtype")})
    with torch.device("cuda"):
        hf = transformers.Qwen2ForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    ids = torch.tensor(prompts, device="cuda")
    gen_kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, temperature=0.7, top_p=0.8,
                  pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        hf.generate(ids, **gen_kw)
        theirs = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            o = hf.generate(ids, **gen_kw)
            torch.cuda.synchronize()
            theirs.append(time.perf_counter() - t0)
    hf_tps = (o.shape[1] - prompt_len) * batch / statistics.median(theirs)
    print(f"sampler qwen2.5-1.5B shape bf16, batch {batch}, {prompt_len}-token prompts, {new_tokens} new, T=0.7 "
          f"top-p 0.8: prm_jax {ours_tps:,.0f} tok/s (compile {compile_s:.0f} s), transformers generate "
          f"{hf_tps:,.0f} tok/s, ratio {ours_tps / hf_tps:.2f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="train,sample")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--variants", default="causal/off/8,causal/off/4,causal/matmuls/8,causal/full/8,packed/full/8",
                    help="attention/remat/batch, comma-separated (see the module docstring)")
    ap.add_argument("--preset", default="qwen2_5_1_5b", help="Qwen2Config preset (small: a CPU smoke run)")
    args = ap.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    parts = args.parts.split(",")
    if "attn" in parts:
        flash_attention_check()
    if "train" in parts:
        for variant in args.variants.split(","):
            try:
                train_mfu(variant, args.seq, args.preset)
            except Exception as e:  # report and go on: one failed variant should not hide the others
                print(f"train {variant}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    if "sample" in parts:
        try:
            sampler_vs_hf(64, 256, 256)
        except Exception as e:
            print(f"sampler: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
