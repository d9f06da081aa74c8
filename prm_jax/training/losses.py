"""Losses as pure functions of (logits, labels). Each returns sums, not means — (loss_sum,
n_labelled, n_correct) — so micro-batches and devices add up exactly and the step divides once
by the number of labelled positions in the whole global batch.

A position is labelled when labels != IGNORE (-100); nothing else in the batch touches the loss.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from prm_jax.data.pipeline import IGNORE

Array = jax.Array


def prm_hard(logits: Array, labels: Array) -> tuple[Array, Array, Array]:
    """2-class cross-entropy at step tokens (the paper's objective). logits [..., 2], labels int 0/1."""
    mask = labels != IGNORE
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    y = jnp.where(mask, labels, 0).astype(jnp.int32)
    nll = -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == y) & mask
    return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask), jnp.sum(correct)


def prm_soft(logits: Array, labels: Array) -> tuple[Array, Array, Array]:
    """Binary cross-entropy between P(correct) = softmax(logits)[1] and a soft target y in [0, 1]:
    -(y log p + (1-y) log(1-p)), with log p and log(1-p) taken from log_softmax (stable).
    A step counts as correct when p and y fall on the same side of 0.5."""
    mask = labels != IGNORE
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    y = jnp.where(mask, labels, 0.0).astype(jnp.float32)
    bce = -(y * logp[..., 1] + (1.0 - y) * logp[..., 0])
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


LOSSES = {"prm": prm_hard, "prm-soft": prm_soft, "lm": causal_lm}
