"""How a model runs, apart from what it computes: storage and compute dtypes, rematerialisation and
the attention kernel. The fields and their checks are declared here once; the model's `Qwen2Config`
and the training config's model section (YAML `model.dtype`, ...) both inherit them.

Imports no jax at module level, so the training config (and the CLI's checks of it) stays light.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from prm_jax.errors import InputError

DTYPES = ("float32", "bfloat16", "float16")
REMAT_SAVES = ("nothing", "matmuls")  # qwen2.REMAT_POLICIES implements each
ATTENTION_IMPLS = ("auto", "xla", "cudnn")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Runtime:
    param_dtype: str = "float32"  # storage ("master") dtype of the weights
    dtype: str = "float32"  # compute dtype; "bfloat16" with param_dtype float32 = bf16 compute, f32 master weights
    remat: bool = False  # recompute each layer's activations in the backward pass
    remat_saves: str = "nothing"  # under remat, what the forward keeps: "nothing" beyond each layer's input,
    # or "matmuls" (every projection's and attention's output; only elementwise work is recomputed)
    attention_impl: str = "xla"  # full-sequence attention: "xla" (any backend), "cudnn" (flash attention on
    # NVIDIA GPUs, bf16/fp16 compute) or "auto" (cudnn where it applies, else xla)

    def __post_init__(self):
        for key, choices in (("dtype", DTYPES), ("param_dtype", DTYPES), ("remat_saves", REMAT_SAVES),
                             ("attention_impl", ATTENTION_IMPLS)):
            if getattr(self, key) not in choices:
                raise InputError(f"{key}: expected one of {', '.join(choices)}, got {getattr(self, key)!r}")

    def runtime(self) -> dict[str, Any]:
        """These fields alone, as keywords (to carry them onto another config)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(Runtime)}

    @property
    def flash(self) -> bool:
        """Whether full-sequence attention runs cuDNN flash attention (read when the model is traced)."""
        if self.attention_impl == "auto":
            import jax  # here, not at the top: see the module docstring
            import jax.numpy as jnp
            return (jax.default_backend() == "gpu" and "nvidia" in jax.devices()[0].device_kind.lower()
                    and jnp.dtype(self.dtype) in (jnp.bfloat16, jnp.float16))
        return self.attention_impl == "cudnn"
