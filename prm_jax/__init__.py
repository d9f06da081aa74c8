"""prm_jax: process reward models for step-by-step math reasoning, natively in JAX."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public API, imported lazily so `import prm_jax` stays light (no jax start-up for the CLI's --help).
_API = {
    "load_causal_lm": "prm_jax.models.hf",
    "load_prm": "prm_jax.models.hf",
    "save_hf": "prm_jax.models.hf",
    "generate": "prm_jax.sampling.sampler",
    "make_mesh": "prm_jax.parallel.mesh",
    "Qwen2Config": "prm_jax.models.config",
    "Qwen2ForCausalLM": "prm_jax.models.qwen2",
    "Qwen2PRM": "prm_jax.models.prm",
    "search": "prm_jax.search",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'prm_jax' has no attribute {name!r}")
