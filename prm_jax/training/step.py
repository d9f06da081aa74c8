"""The jitted training and evaluation steps, the optimizer and its learning-rate schedule.

    params, opt_state, metrics = train_step(params, opt_state, batch)

`params` is the model's nnx state as a plain dict (nnx.split -> to_pure_dict), sharded by the
parameters' logical axes (`parallel.mesh.state_shardings`); the optimizer state follows the
parameters it belongs to; the batch [accum, micro, T] is split over the mesh's data axes; both
state arguments are donated. Inside, a `lax.scan` over the accumulation micro-batches sums
gradients of summed losses, then divides once by the number of labelled positions of the whole
global batch (so accumulation is exact, not an average of micro-batch means). AdamW with
warmup + cosine decay and global-norm clipping follows. A non-finite loss or gradient leaves
params and optimizer state untouched (metrics["ok"] is False; the loop stops on it).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from prm_jax.parallel import mesh as pmesh
from prm_jax.training.config import TrainConfig
from prm_jax.training.losses import LOSSES


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


_STEP_CACHE: dict[tuple, tuple[Callable, Callable]] = {}


def cached_steps(cfg: TrainConfig, graphdef, objective: str, tx, mesh, param_shardings, opt_shardings,
                 schedule: optax.Schedule, class_weights: tuple[float, float] | None) -> tuple[Callable, Callable]:
    """(train_step, eval_step), reused (and so their compilations) across train() calls in one process
    with the same model, mesh, objective and optimizer settings (the demo and tests train repeatedly)."""
    key = (graphdef, mesh, objective, json.dumps(dataclasses.asdict(cfg.optim), sort_keys=True), cfg.run.steps,
           class_weights, cfg.data.pack)
    if key not in _STEP_CACHE:
        _STEP_CACHE.clear()  # keep only the latest: a cached step pins its compiled executables
        _STEP_CACHE[key] = (make_train_step(graphdef, objective, tx, mesh, param_shardings, opt_shardings, schedule,
                                            class_weights, packed=cfg.data.pack),
                            make_eval_step(graphdef, objective, mesh, param_shardings, packed=cfg.data.pack))
    return _STEP_CACHE[key]
