"""The training loop: PRM (hard or soft step labels) or policy (causal LM), one jitted step.

    params, opt_state, metrics = train_step(params, opt_state, batch)

`params` is the model's nnx state as a plain dict (nnx.split -> to_pure_dict), sharded by the
parameters' logical axes (`parallel.mesh.state_shardings`); the optimizer state follows the
parameters it belongs to; the batch [accum, micro, T] is split over the mesh's data axes; both
state arguments are donated. Inside, a `lax.scan` over the accumulation micro-batches sums
gradients of summed losses, then divides once by the number of labelled positions of the whole
global batch (so accumulation is exact, not an average of micro-batch means). AdamW with
warmup + cosine decay and global-norm clipping follows. A non-finite loss or gradient leaves
params and optimizer state untouched, and the loop stops with a clear error, never saving it.

Every `log_every` steps a row is appended to OUT/metrics.jsonl (see `_log_row`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from prm_jax.data import pipeline as pl
from prm_jax.errors import InputError, RunError
from prm_jax.data.prm_format import resolve_step_token
from prm_jax.models.prm import Qwen2PRM
from prm_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from prm_jax.parallel import mesh as pmesh
from prm_jax.training import checkpoint as ck
from prm_jax.training.config import TrainConfig
from prm_jax.training.losses import LOSSES, balanced_class_weights

log = logging.getLogger(__name__)


class TrainingDiverged(RunError):
    """The loss or the gradient norm became NaN/inf."""


# -- model ------------------------------------------------------------------------------------

PRESETS = {"tiny": Qwen2Config.tiny, "small": Qwen2Config.small, "qwen2_5_1_5b": Qwen2Config.qwen2_5_1_5b,
           "qwen2_5_math_7b": Qwen2Config.qwen2_5_math_7b}


def arch_for(objective: str) -> str:
    return "lm" if objective == "lm" else "prm"


def model_class(arch: str):
    return {"prm": Qwen2PRM, "lm": Qwen2ForCausalLM}[arch]


def fresh_config(preset: str, overrides: dict[str, Any], vocab_needed: int) -> Qwen2Config:
    """A from-scratch Qwen2Config; the vocabulary grows to fit the tokenizer unless set explicitly."""
    if preset not in PRESETS:
        raise InputError(f"model preset {preset!r}: expected one of {', '.join(PRESETS)}")
    base = PRESETS[preset](**overrides)
    if "vocab_size" not in overrides and base.vocab_size < vocab_needed:
        base = base.replace(vocab_size=-(-vocab_needed // 64) * 64)
    return base


def match_dtype(params: dict, shardings: dict, dtype: str) -> dict:
    """Cast to the master-weight dtype (one jitted cast, kept sharded) unless already there."""
    if all(a.dtype == jnp.dtype(dtype) for a in jax.tree.leaves(params)):
        return params
    return jax.jit(lambda p: jax.tree.map(lambda a: a.astype(dtype), p), out_shardings=shardings)(params)


def init_from_hf(init_dir: str, arch: str, mesh, seed: int, param_dtype: str) -> tuple[dict, Qwen2Config]:
    """Pure-dict params + config from a Hugging Face directory. A PRM run from a causal-LM
    checkpoint (the paper: Qwen2.5-Math-Instruct) keeps the backbone and gets a fresh score head
    (seeded), the LM head dropped (`hf.load_prm` does this)."""
    from prm_jax.models import hf

    if arch == "lm":
        model = hf.load_causal_lm(init_dir, mesh=mesh, param_dtype=param_dtype)
    else:
        model = hf.load_prm(init_dir, mesh=mesh, param_dtype=param_dtype, seed=seed)
    return nnx.to_pure_dict(nnx.state(model)), model.cfg


def init_fresh(cfg: Qwen2Config, arch: str, mesh, seed: int) -> dict:
    model = pmesh.create_sharded(lambda: model_class(arch)(cfg, nnx.Rngs(seed)), mesh)
    return nnx.to_pure_dict(nnx.state(model))


def mesh_devices(spec: str | None, devices: Sequence[Any] | None = None) -> list:
    """The devices a mesh spec uses: a spec without -1 that names fewer devices than are present
    (e.g. "fsdp=2" on 8) takes the first ones; otherwise all of them (make_mesh checks the spec)."""
    devices = list(devices if devices is not None else jax.devices())
    if spec and "-1" not in spec:
        sizes = [part.partition("=")[2].strip() for part in spec.split(",")]
        if all(s.isdigit() for s in sizes) and math.prod(int(s) for s in sizes) < len(devices):
            return devices[:math.prod(int(s) for s in sizes)]
    return devices


# -- optimizer ----------------------------------------------------------------------------------

def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    o, steps = cfg.optim, cfg.run.steps
    warmup = min(o.warmup_steps, steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else o.lr, peak_value=o.lr, warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1), end_value=o.lr * o.min_lr_ratio)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    o = cfg.optim
    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm else []
    parts.append(optax.adamw(make_schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                             mask=lambda p: jax.tree.map(lambda a: a.ndim >= 2, p)))
    return optax.chain(*parts)


def opt_state_shardings(tx, params_abstract, param_shardings, mesh) -> Any:
    """The optimizer state's leaves that mirror a parameter take its sharding; counters are replicated."""
    abstract = jax.eval_shape(tx.init, params_abstract)
    rep = NamedSharding(mesh, P())
    return optax.tree_map_params(tx, lambda _, s: s, abstract, param_shardings,
                                 transform_non_params=lambda _: rep,
                                 is_leaf=lambda x: isinstance(x, NamedSharding)), abstract


# -- steps --------------------------------------------------------------------------------------

def batch_sharding(mesh) -> NamedSharding:
    """Every batch array is [accum, micro, length]: micro-batch rows over the data axes."""
    return pmesh.batch_sharding(mesh, 3, axis=1)


def _forward_loss(graphdef, loss_fn, params, mb, packed: bool = True):
    """Unpacked rows (one right-padded sequence each) need no segment mask: a real token never sees a
    later pad, and pads carry no label. Leaving it out lets flash attention skip its [T, T] bias.
    A PRM batch with `score_positions` (pipeline.with_score_positions) gets logits there alone."""
    model = nnx.merge(graphdef, params)
    kw = {"segment_ids": mb["segment_ids"] if packed else None}
    if "score_positions" in mb:
        logits = model(mb["input_ids"], positions=mb["positions"], score_positions=mb["score_positions"], **kw)
        return loss_fn(logits, mb["score_labels"])
    return loss_fn(model(mb["input_ids"], positions=mb["positions"], **kw), mb["labels"])


def make_train_step(graphdef, objective: str, tx, mesh, param_shardings, opt_shardings,
                    schedule: optax.Schedule | None = None,
                    class_weights: tuple[float, float] | None = None, packed: bool = True) -> Callable:
    """One jitted step over a batch [accum, micro, T] (see the module docstring)."""
    loss_fn = LOSSES[objective]
    if class_weights is not None:
        loss_fn = functools.partial(loss_fn, class_weights=class_weights)

    def step(params, opt_state, batch):
        def grads_of(mb):
            def f(p):
                l_, n_, c_ = _forward_loss(graphdef, loss_fn, p, mb, packed)
                return l_, (n_, c_)

            (l, (n_, c_)), g = jax.value_and_grad(f, has_aux=True)(params)
            return jax.tree.map(lambda a: a.astype(jnp.float32), g), l, n_, c_

        def micro(carry, mb):
            g, l, n_, c_ = grads_of(mb)
            gsum, lsum, n, c = carry
            return (jax.tree.map(jnp.add, gsum, g), lsum + l, n + n_, c + c_), None

        if batch["input_ids"].shape[0] == 1:  # no accumulation: no f32 zero tree to add into
            gsum, lsum, n, c = grads_of(jax.tree.map(lambda a: a[0], batch))
        else:
            zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), params)
            init = (zeros, jnp.float32(0), jnp.int32(0), jnp.int32(0))
            (gsum, lsum, n, c), _ = jax.lax.scan(micro, init, batch)
        denom = jnp.maximum(n, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), gsum, params)
        loss = lsum / denom
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # Also refuse a finite gradient whose update would make a parameter inf/nan.
        finite_params = jax.tree.reduce(jnp.logical_and, jax.tree.map(lambda a: jnp.isfinite(a).all(), new_params))
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & finite_params
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        metrics = {"loss": loss, "accuracy": c / denom, "grad_norm": grad_norm, "labels": n, "ok": ok}
        if schedule is not None:  # the learning rate this step used (count = updates done before it)
            metrics["lr"] = schedule(optax.tree_utils.tree_get_all_with_path(opt_state, "count")[0][1])
        return keep(new_params, params), keep(new_opt, opt_state), metrics

    rep = NamedSharding(mesh, P())
    return jax.jit(step, in_shardings=(param_shardings, opt_shardings, batch_sharding(mesh)),
                   out_shardings=(param_shardings, opt_shardings, rep), donate_argnums=(0, 1))


def make_eval_step(graphdef, objective: str, mesh, param_shardings, packed: bool = True) -> Callable:
    loss_fn = LOSSES[objective]

    def step(params, batch):
        def micro(carry, mb):
            l, n, c = _forward_loss(graphdef, loss_fn, params, mb, packed)
            return (carry[0] + l, carry[1] + n, carry[2] + c), None
        (l, n, c), _ = jax.lax.scan(micro, (jnp.float32(0), jnp.int32(0), jnp.int32(0)), batch)
        return l, n, c

    return jax.jit(step, in_shardings=(param_shardings, batch_sharding(mesh)), out_shardings=NamedSharding(mesh, P()))


# -- FLOPs and MFU ------------------------------------------------------------------------------

# Dense bf16 peak FLOP/s per device (jax.devices()[0].device_kind, lower-cased substring).
PEAK_FLOPS = {
    "tpu v6": 918e12, "tpu v5p": 459e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v4": 275e12,
    "h200": 989e12, "h100": 989e12, "a100": 312e12, "l40s": 362e12, "a10g": 125e12,
}


def peak_flops_per_device(device_kind: str, configured: float | None = None) -> float | None:
    if configured:
        return float(configured)
    kind = device_kind.lower()
    for key, value in PEAK_FLOPS.items():
        if key in kind:
            return value
    return None  # CPU and unknown devices: MFU is not reported


def matmul_params(cfg: Qwen2Config, arch: str) -> int:
    """Parameters that take part in a matmul per token (the embedding lookup is not one)."""
    h, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_size
    attn = h * cfg.num_heads * hd * 2 + h * cfg.num_kv_heads * hd * 2  # q, o ; k, v
    per_layer = attn + 3 * h * f
    head = h * h + h * 2 if arch == "prm" else h * cfg.vocab_size
    return cfg.num_layers * per_layer + head


def train_flops_per_token(cfg: Qwen2Config, arch: str, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the PaLM / MaxText convention:
        6 * N  +  12 * L * H * D * T
    N = matmul parameters (`matmul_params`), L layers, H query heads of size D, T the row length
    (attention scores and the weighted sum, 2 matmuls x 2 FLOPs x 3 for fwd+bwd, without the
    causal half). Recomputation under remat is not counted (this is MFU, not HFU); nor is the PRM
    step's saving of running its last layer's queries and MLP at step tokens alone (~1/L of the
    work), so a PRM run's figure is that much above the work actually done."""
    return 6.0 * matmul_params(cfg, arch) + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_size * seq_len


_STEP_CACHE: dict[tuple, tuple[Callable, Callable]] = {}


# -- the run ------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Window:
    """Accumulates device metrics between log rows (fetched once per row, not per step)."""
    steps: list = dataclasses.field(default_factory=list)
    real: int = 0
    padded: int = 0
    flops: float = 0.0
    t0: float = dataclasses.field(default_factory=time.perf_counter)


def _log_row(step: int, window: _Window, n_devices: int, peak: float | None) -> dict[str, Any]:
    """metrics.jsonl row: loss / accuracy averaged over the window's labelled positions; grad norm
    and learning rate of the last step; tokens/s over the window's wall time (real tokens and
    padded slots); MFU = model FLOPs of the real tokens / (wall time * devices * peak)."""
    fetched = jax.device_get(window.steps)
    n = sum(int(m["labels"]) for m in fetched)
    loss = sum(float(m["loss"]) * int(m["labels"]) for m in fetched) / max(n, 1)
    acc = sum(float(m["accuracy"]) * int(m["labels"]) for m in fetched) / max(n, 1)
    dt = max(time.perf_counter() - window.t0, 1e-9)
    last = fetched[-1]
    return {
        "step": step, "loss": loss, "step_accuracy": acc, "grad_norm": float(last["grad_norm"]),
        "lr": float(last["lr"]), "labels": n,
        # None when the window held only the (compiling) first step of the process
        "tokens_per_s": window.real / dt if window.padded else None,
        "padded_tokens_per_s": window.padded / dt if window.padded else None,
        "mfu": (window.flops / dt / (n_devices * peak)) if peak and window.padded else None,
        "time": time.time(),
    }


def _rewrite_metrics(path: str, upto: int) -> None:
    """On resume, drop rows logged after the checkpoint being resumed from."""
    if not os.path.exists(path):
        return
    from prm_jax.records import read_jsonl, repair_tail, write_jsonl
    repair_tail(path)
    write_jsonl(path, [r for r in read_jsonl(path) if r.get("step", 0) <= upto])


def _append(path: str, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def evaluate(eval_step, params, encoded: pl.EncodedSet, rows: int, pad_id: int, max_length: int,
             buckets, mesh, arch: str) -> dict[str, float]:
    lsum, n, c = 0.0, 0, 0
    for batch in pl.eval_batches(encoded.examples, batch_rows=rows, pad_id=pad_id, max_length=max_length,
                                 buckets=buckets):
        if arch == "prm":
            batch = pl.with_score_positions(batch)
        l_, n_, c_ = jax.device_get(eval_step(params, pl.place_batch(batch, mesh)))
        lsum, n, c = lsum + float(l_), n + int(n_), c + int(c_)
    return {"eval_loss": lsum / max(n, 1), "eval_step_accuracy": c / max(n, 1), "eval_labels": n}


def train(config: TrainConfig, train_file: str, out_dir: str, *, init_dir: str | None = None,
          eval_file: str | None = None, objective: str = "prm", devices: Sequence[Any] | None = None,
          callbacks: Sequence[Callable[[int], None]] = (), progress: bool = True) -> dict[str, Any]:
    """Train (or resume, when OUT already holds checkpoints) and return the summary dict.

    The model comes from `init_dir` (a Hugging Face directory; a causal LM gets a fresh score head
    for PRM objectives), or is built fresh from `config.model.preset` (+ overrides) with the
    tokenizer in `config.model.tokenizer`. `callbacks` are called with the step number after each
    step (tests use them to deliver SIGTERM at a chosen step)."""
    if objective not in LOSSES:
        raise InputError(f"objective {objective!r}: expected one of {', '.join(LOSSES)}")
    cfg, run, dcfg = config, config.run, config.data
    arch = arch_for(objective)
    if not _has_steps(os.path.join(out_dir, "checkpoints")):  # a fresh run reads them; a resumed one does not
        check_model_dirs(init_dir, cfg.model.tokenizer)
    primary = jax.process_index() == 0  # the one process that writes metrics, summary and tokenizer
    mesh = pmesh.make_mesh(run.mesh, devices=mesh_devices(run.mesh, devices))
    n_devices = mesh.devices.size
    ways = pmesh.batch_ways(mesh)
    accum = cfg.optim.accum_steps
    if dcfg.batch_size % accum or (dcfg.batch_size // accum) % ways:
        raise InputError(f"data.batch_size={dcfg.batch_size} must split into optim.accum_steps={accum} micro-batches "
                         f"whose size divides over data*fsdp={ways} devices")
    micro = dcfg.batch_size // accum

    os.makedirs(out_dir, exist_ok=True)  # only after the checks above, so a bad command leaves no half-made OUT
    ckpt = ck.Checkpointer(os.path.join(out_dir, "checkpoints"), keep=run.keep)
    # Resume from the newest step whose meta reads (a corrupt newer one is skipped, and said so); the
    # arrays are restored further down, falling back further if they do not restore either.
    latest, meta = ck.restore_newest(ckpt, ckpt.read_meta) if ckpt.all_steps() else (None, None)
    tok_dir = os.path.join(out_dir, "tokenizer")
    metrics_path = os.path.join(out_dir, "metrics.jsonl")

    # -- model, tokenizer -------------------------------------------------------------------
    if latest is not None:
        if meta.get("objective") != objective:
            raise InputError(f"{out_dir} holds a run with objective {meta.get('objective')!r}, not {objective!r}; "
                             "use a new --out directory")
        model_cfg = Qwen2Config(**meta["model_config"])
        tokenizer = _load_tokenizer(tok_dir)
        params = None
    else:
        tokenizer = _load_tokenizer(cfg.model.tokenizer or init_dir) if (cfg.model.tokenizer or init_dir) else None
        if tokenizer is None:
            raise InputError("no tokenizer: give --init DIR or set model.tokenizer (--tokenizer)")
        if init_dir:
            params, model_cfg = init_from_hf(init_dir, arch, mesh, run.seed, cfg.model.param_dtype)
            source = init_dir
        elif cfg.model.preset:
            model_cfg = fresh_config(cfg.model.preset, cfg.model.overrides, len(tokenizer))
            params = None
            source = f"fresh {cfg.model.preset} model"
        else:
            raise InputError("no model: give --init DIR or --init-config PRESET|YAML (model.preset)")
    m = cfg.model
    model_cfg = model_cfg.replace(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, remat_saves=m.remat_saves,
                                  attention_impl=m.attention_impl)

    step_token_id = None
    if arch == "prm":
        step_token_id = resolve_step_token(tokenizer, dcfg.step_token)
        if step_token_id >= model_cfg.vocab_size:
            raise InputError(f"step token {dcfg.step_token!r} has id {step_token_id}, outside the model's vocabulary "
                             f"of {model_cfg.vocab_size}")
    if latest is None:
        if primary:
            tokenizer.save_pretrained(tok_dir)
        if params is None:
            params = init_fresh(model_cfg, arch, mesh, run.seed)
    if tokenizer.pad_token_id is None:
        raise InputError("the tokenizer has no pad token")

    # -- data ---------------------------------------------------------------------------------
    opts = pl.EncodeOptions(objective=objective, max_length=dcfg.max_length, step_token_id=step_token_id,
                            step_token_text=dcfg.step_token if arch == "prm" and not str(dcfg.step_token).isdigit()
                            else None,
                            system_prompt=dcfg.system_prompt, eos_token_id=tokenizer.eos_token_id)
    train_set = pl.encode_records(tokenizer, train_file, opts, progress=progress)
    eval_set = pl.encode_records(tokenizer, eval_file, opts, progress=progress) if eval_file else None
    log.info("train data: %s", train_set.stats.summary())
    class_weights = None
    if cfg.optim.class_balance and arch == "prm":
        class_weights = balanced_class_weights(train_set.examples)
        log.info("class weights (wrong, right): %.3f, %.3f", *class_weights)
    dataset = pl.train_dataset(train_set.examples, batch_rows=dcfg.batch_size, seed=run.seed,
                               pad_id=tokenizer.pad_token_id, max_length=dcfg.max_length, pack=dcfg.pack,
                               buckets=dcfg.buckets, group_by_length=dcfg.group_by_length)
    data_iter = iter(dataset)

    # -- state, step functions ------------------------------------------------------------------
    tx = make_optimizer(cfg)
    schedule = make_schedule(cfg)
    abstract_model = nnx.eval_shape(lambda: model_class(arch)(model_cfg, nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract_model)
    param_sh = nnx.to_pure_dict(pmesh.state_shardings(abs_state, mesh))
    abs_params = nnx.to_pure_dict(abs_state)
    opt_sh, abs_opt = opt_state_shardings(tx, abs_params, param_sh, mesh)
    if latest is not None:
        abs_p, abs_o = ck.abstract_like(abs_params, param_sh), ck.abstract_like(abs_opt, opt_sh)
        latest, (params, opt_state, data_state, _) = ck.restore_newest(
            ckpt, lambda s: ckpt.restore(s, abs_p, abs_o), [s for s in ckpt.all_steps() if s <= latest])
        source = f"resumed from step {latest}"
        newer = [s for s in ckpt.all_steps() if s > latest]
        for path in ckpt.set_aside(newer):  # out of the way of this run's own saves of those steps
            log.warning("moved the checkpoint that does not restore to %s", path)
        data_iter.set_state(data_state)
        start = latest
        if primary:
            _rewrite_metrics(metrics_path, latest)
    else:
        params = match_dtype(params, param_sh, model_cfg.param_dtype)
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
        start = 0
        if primary and os.path.exists(metrics_path):
            os.remove(metrics_path)
    # Reuse the jitted steps (and so their compilations) across train() calls in one process with
    # the same model, mesh, objective and optimizer settings (the demo and tests train repeatedly).
    key = (graphdef, mesh, objective, json.dumps(dataclasses.asdict(cfg.optim), sort_keys=True), run.steps,
           class_weights, dcfg.pack)
    if key not in _STEP_CACHE:
        _STEP_CACHE.clear()  # keep only the latest: a cached step pins its compiled executables
        _STEP_CACHE[key] = (make_train_step(graphdef, objective, tx, mesh, param_sh, opt_sh, schedule,
                                            class_weights, packed=dcfg.pack),
                            make_eval_step(graphdef, objective, mesh, param_sh, packed=dcfg.pack))
    train_step, eval_step = _STEP_CACHE[key]
    eval_rows = run.eval_batch_size or micro
    meta = {**ck.model_meta(model_cfg, arch), "objective": objective, "config": cfg.to_dict(),
            "tokenizer_dir": os.path.abspath(tok_dir), "step_token_id": step_token_id}
    peak = peak_flops_per_device(jax.devices()[0].device_kind, run.peak_flops)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abs_params))
    log.info("model: %s (%s), %.2fM params, mesh %s, %s", arch, source, n_params / 1e6, dict(mesh.shape),
             train_set.stats.summary())

    # -- loop -----------------------------------------------------------------------------------
    stop = {"signal": None}
    prev_handler = None

    def on_sigterm(signum, frame):  # only flag it; the loop saves at the next step boundary
        stop["signal"] = signum

    # Single host: our handler. Multi-host: hosts receive SIGTERM at different moments, so they agree
    # on the step to stop at through JAX's preemption sync (orbax `reached_preemption`).
    multi_host = jax.process_count() > 1
    if not multi_host and threading_is_main():
        prev_handler = signal.signal(signal.SIGTERM, on_sigterm)

    def save(step: int, data_state: dict) -> None:
        ckpt.save(step, params, opt_state, data_state, meta)

    def eval_row(step: int) -> dict[str, Any]:
        row = {"step": step, "split": "eval",
               **evaluate(eval_step, params, eval_set, eval_rows, tokenizer.pad_token_id, dcfg.max_length,
                          dcfg.buckets, mesh, arch)}
        if primary:
            _append(metrics_path, row)
        return row

    window = _Window()
    pending = None  # (step, ok) of the last dispatched step, checked one step late (keeps the device busy)
    last_row: dict[str, Any] = {}
    last_eval: dict[str, Any] = {}
    total_real = total_padded = 0
    t_start = time.perf_counter()
    status = "completed"
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=run.steps, initial=start, desc=f"train {objective}", unit="step")

    def check(p):
        step_, ok_ = p
        if not bool(ok_):
            good = ckpt.latest_step()
            raise TrainingDiverged(
                f"non-finite loss, gradient or update at step {step_}: parameters were not updated and no checkpoint "
                f"was written after it; last good checkpoint: "
                f"{os.path.join(ckpt.directory, str(good)) if good is not None else 'none'}. "
                "Lower optim.lr, enable clipping, or check the data.")

    try:
        step = start
        while step < run.steps:
            host_batch = next(data_iter)
            data_state = data_iter.get_state()
            if arch == "prm":  # logits only at the labelled step tokens
                host_batch = pl.with_score_positions(host_batch)
            real = int((host_batch["segment_ids"] > 0).sum())
            padded = int(host_batch["segment_ids"].size)
            batch = pl.place_batch(host_batch, mesh, accum)
            params, opt_state, metrics = train_step(params, opt_state, batch)
            step += 1
            if pending is not None:
                check(pending)
            pending = (step, metrics["ok"])
            window.steps.append(metrics)
            if step == start + 1:
                # The first step of a process includes compilation: leave it out of tokens/s and MFU.
                jax.block_until_ready(metrics["loss"])
                window.t0 = time.perf_counter()
            else:
                window.real += real
                window.padded += padded
                window.flops += real * train_flops_per_token(model_cfg, arch, host_batch["input_ids"].shape[1])
            total_real += real
            total_padded += padded
            for cb in callbacks:
                cb(step)
            if multi_host and ckpt.manager.reached_preemption(step):
                stop["signal"] = signal.SIGTERM
            # Read the flag once: a signal landing later in this step (during a periodic save, a log
            # row, an eval) is acted on at the next step, never half-seen (logged as saved, not saved).
            stopping = stop["signal"] is not None
            must_log = step % run.log_every == 0 or step == run.steps or stopping
            must_save = (run.save_every and step % run.save_every == 0) or step == run.steps or stopping
            if must_log or must_save:
                check(pending)
                pending = None
            if must_log:
                last_row = _log_row(step, window, n_devices, peak)
                if primary:
                    _append(metrics_path, last_row)
                window = _Window()
                if bar is not None:
                    bar.set_postfix(loss=f"{last_row['loss']:.4f}", acc=f"{last_row['step_accuracy']:.3f}")
            if stopping:  # on disk before we say so and exit
                ckpt.save_now(step, params, opt_state, data_state, meta)
            elif must_save:
                save(step, data_state)
            if eval_set is not None and run.eval_every and step % run.eval_every == 0 and step != run.steps:
                last_eval = eval_row(step)
            if bar is not None:
                bar.update(1)
            if stopping:
                status = "preempted"
                log.warning("SIGTERM: saved step %d to %s; rerun the same command to resume", step, ckpt.directory)
                break
        if pending is not None:
            check(pending)
        if status == "completed" and eval_set is not None:
            last_eval = eval_row(step)
    finally:
        if bar is not None:
            bar.close()
        ckpt.wait()
        if prev_handler is not None:
            signal.signal(signal.SIGTERM, prev_handler)

    hf_dir = None
    if status == "completed" and run.export_hf:  # every process takes part in the gathers; process 0 writes
        from prm_jax.models import hf
        hf_dir = os.path.join(out_dir, "hf")
        hf.save_hf(nnx.merge(graphdef, params), hf_dir, tokenizer_dir=tok_dir, step_token_id=step_token_id)
    ckpt.close()
    elapsed = time.perf_counter() - t_start
    summary = {
        "status": status, "objective": objective, "step": step, "steps": run.steps, "resumed_from": latest,
        "source": source, "params": n_params, "mesh": dict(mesh.shape), "class_weights": class_weights,
        "loss": last_row.get("loss"), "step_accuracy": last_row.get("step_accuracy"), **last_eval,
        "tokens": total_real, "padded_tokens": total_padded, "time_s": elapsed,
        "tokens_per_s": total_real / elapsed if elapsed else None,
        "data": dataclasses.asdict(train_set.stats), "checkpoints": ckpt.directory, "hf": hf_dir,
        "metrics": metrics_path,
    }
    summary.pop("split", None)
    if primary:
        with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return summary


def _has_steps(checkpoints_dir: str) -> bool:
    return os.path.isdir(checkpoints_dir) and any(n.isdigit() for n in os.listdir(checkpoints_dir))


def check_model_dirs(init_dir: str | None, tokenizer_dir: str | None) -> None:
    """A fresh run's --init and tokenizer must be local directories (the Hugging Face hub's own error
    for a missing path is about repo ids); checked before OUT is created."""
    if init_dir is not None and not os.path.isfile(os.path.join(init_dir, "config.json")):
        why = "no config.json in it" if os.path.isdir(init_dir) else "no such directory"
        raise FileNotFoundError(f"--init {init_dir}: {why}; expected a local Hugging Face model directory")
    if tokenizer_dir is not None and not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"tokenizer {tokenizer_dir}: no such directory; expected a local tokenizer directory "
                                "(--tokenizer, model.tokenizer)")


def threading_is_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def format_summary(s: dict[str, Any]) -> str:
    def num(x, fmt):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)
    lines = [
        f"{s['status']}: {s['objective']} step {s['step']}/{s['steps']}"
        + (f" (resumed from {s['resumed_from']})" if s["resumed_from"] is not None else ""),
        f"  loss {num(s['loss'], '.4f')}  step accuracy {num(s['step_accuracy'], '.4f')}",
    ]
    if "eval_loss" in s:
        lines.append(f"  eval loss {num(s['eval_loss'], '.4f')}  eval step accuracy "
                     f"{num(s['eval_step_accuracy'], '.4f')} over {s['eval_labels']} labels")
    d = s["data"]
    lines += [
        f"  data: {d['kept']}/{d['records']} records, {d['truncated_records']} truncated "
        f"({d['dropped_step_labels']} step labels dropped), {d['dropped_records']} dropped",
        f"  {s['tokens']} real tokens ({s['padded_tokens']} padded slots) in {s['time_s']:.1f}s = "
        f"{num(s['tokens_per_s'], '.0f')} tokens/s",
        f"  checkpoints: {s['checkpoints']}" + (f"\n  hf export: {s['hf']}" if s["hf"] else ""),
        f"  metrics: {s['metrics']}",
    ]
    return "\n".join(lines)
