"""Which model each training objective builds: the one table of architectures.

An architecture name ("prm" | "lm") is what the trainer builds, what a checkpoint's meta records
(`arch`) and which Hugging Face layout `hf` loads and writes (`architectures` in config.json).
"""
from __future__ import annotations

from flax import nnx

from prm_jax.models.prm import Qwen2PRM
from prm_jax.models.qwen2 import Qwen2ForCausalLM

ARCHITECTURES: dict[str, type[nnx.Module]] = {"prm": Qwen2PRM, "lm": Qwen2ForCausalLM}
HF_ARCHITECTURES = {"prm": "Qwen2ForProcessRewardModel", "lm": "Qwen2ForCausalLM"}  # config.json "architectures"
OBJECTIVE_ARCH = {"prm": "prm", "prm-soft": "prm", "lm": "lm"}  # training objective (losses.LOSSES) -> arch


def arch_for(objective: str) -> str:
    return OBJECTIVE_ARCH[objective]


def arch_of(model: nnx.Module) -> str:
    """The architecture name of a model instance."""
    for arch, cls in ARCHITECTURES.items():
        if isinstance(model, cls):
            return arch
    raise TypeError(f"expected a {' or '.join(c.__name__ for c in ARCHITECTURES.values())}, "
                    f"got {type(model).__name__}")
