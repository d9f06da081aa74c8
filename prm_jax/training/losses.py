"""Losses as pure functions of (logits, labels). Each returns sums, not means — (loss_sum,
n_labelled, n_correct) — so micro-batches and devices add up exactly and the step divides once
by the number of labelled positions in the whole global batch.

A position is labelled when labels != IGNORE (-100); nothing else in the batch touches the loss.
The PRM losses take optional `class_weights` (w_wrong, w_right): each labelled position's loss is
scaled by the weight of its class (a soft target's class is the side of 0.5 it falls on).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from prm_jax.data.pipeline import IGNORE

Array = jax.Array


def _class_scale(y_class: Array, class_weights: tuple[float, float] | None) -> Array | float:
    if class_weights is None:
        return 1.0
    return jnp.where(y_class == 1, class_weights[1], class_weights[0]).astype(jnp.float32)


def prm_hard(logits: Array, labels: Array, class_weights: tuple[float, float] | None = None
             ) -> tuple[Array, Array, Array]:
    """2-class cross-entropy at step tokens (the paper's objective). logits [..., 2], labels int 0/1."""
    mask = labels != IGNORE
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    y = jnp.where(mask, labels, 0).astype(jnp.int32)
    nll = -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0] * _class_scale(y, class_weights)
    correct = (jnp.argmax(logits, axis=-1) == y) & mask
    return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask), jnp.sum(correct)


def prm_soft(logits: Array, labels: Array, class_weights: tuple[float, float] | None = None
             ) -> tuple[Array, Array, Array]:
    """Binary cross-entropy between P(correct) = softmax(logits)[1] and a soft target y in [0, 1]:
    -(y log p + (1-y) log(1-p)), with log p and log(1-p) taken from log_softmax (stable).
    A step counts as correct when p and y fall on the same side of 0.5."""
    mask = labels != IGNORE
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    y = jnp.where(mask, labels, 0.0).astype(jnp.float32)
    bce = -(y * logp[..., 1] + (1.0 - y) * logp[..., 0]) * _class_scale((y > 0.5).astype(jnp.int32), class_weights)
    correct = ((logp[..., 1] > jnp.log(0.5)) == (y > 0.5)) & mask
    return jnp.sum(jnp.where(mask, bce, 0.0)), jnp.sum(mask), jnp.sum(correct)


def causal_lm(logits: Array, labels: Array) -> tuple[Array, Array, Array]:
    """Next-token cross-entropy; labels are already shifted (labels[t] = the token after t)."""
    mask = labels != IGNORE
    logits = logits.astype(jnp.float32)
    y = jnp.where(mask, labels, 0).astype(jnp.int32)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == y) & mask
    return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask), jnp.sum(correct)


def balanced_class_weights(examples: list[dict]) -> tuple[float, float]:
    """Inverse-frequency weights (w_wrong, w_right) = N / (2 N_class) over the labelled positions
    of `examples`, so each class carries half of the loss and the mean weight stays 1. A class that
    never occurs leaves both weights at 1."""
    ys = [e["labels"][e["labels"] != IGNORE] for e in examples]
    right = sum(int((y > 0.5).sum()) for y in ys)
    total = sum(int(y.size) for y in ys)
    wrong = total - right
    if not right or not wrong:
        return 1.0, 1.0
    return total / (2 * wrong), total / (2 * right)


LOSSES = {"prm": prm_hard, "prm-soft": prm_soft, "lm": causal_lm}
