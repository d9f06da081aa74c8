"""The process reward model: Qwen2 backbone + a two-layer score head, no LM head.

score = Linear(h, h) -> ReLU -> Linear(h, 2), as in the released Qwen2.5-Math-PRM. The reward of
a step is the softmax probability of class 1 ("correct") at the step-separator token that ends it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prm_jax.models.qwen2 import Array, Dense, Qwen2Config, Qwen2Model


class ScoreHead(nnx.Module):
    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs, num_labels: int = 2):
        h = cfg.hidden_size
        self.dense_in = Dense(h, h, ("embed", "mlp"), bias=True, cfg=cfg, rngs=rngs)  # HF score.0
        self.dense_out = Dense(h, num_labels, ("mlp", "classes"), bias=True, cfg=cfg, rngs=rngs)  # HF score.2

    def __call__(self, x: Array) -> Array:
        return self.dense_out(jax.nn.relu(self.dense_in(x)))


class Qwen2PRM(nnx.Module):
    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = Qwen2Model(cfg, rngs)
        self.score = ScoreHead(cfg, rngs)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, *, positions: Array | None = None,
                 segment_ids: Array | None = None, score_positions: Array | None = None) -> Array:
        """Class logits in f32: [B, T, 2] at every position, or [B, K, 2] at score_positions [B, K]
        alone (the same values; the last layer's queries and MLP then run at K positions only)."""
        hidden = self.model(input_ids, attention_mask, positions=positions, segment_ids=segment_ids,
                            only=score_positions)
        return self.score(hidden).astype(jnp.float32)


def step_probs(logits: Array) -> Array:
    """P(step correct) = softmax(logits)[..., 1], at every position."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1]


def step_rewards(logits, input_ids, step_token_id: int) -> list[list[float]]:
    """Per row, P(correct) at each step-token position, in order (host-side lists)."""
    probs = np.asarray(step_probs(jnp.asarray(logits)))
    ids = np.asarray(input_ids)
    return [probs[b][ids[b] == step_token_id].tolist() for b in range(ids.shape[0])]
