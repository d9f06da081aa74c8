"""`Qwen2Config`: the shape of a Qwen2 model, its named presets, and its Hugging Face config.json.

The runtime fields (dtypes, remat, attention kernel) come from `Runtime` (models/runtime.py).
Imports no jax, so the training config can check a preset name without starting jax.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from prm_jax.errors import InputError
from prm_jax.models.runtime import Runtime

# Named model shapes, the one list of them (`Qwen2Config.preset`, the training config's `model.preset`).
PRESETS: dict[str, dict[str, Any]] = {
    # a few-hundred-kilobyte model for unit tests
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2),
    # the benchmark config of the issues (vocab 32000, hidden 512, 8 layers)
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
                  num_kv_heads=2),
    "qwen2_5_1_5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                         num_kv_heads=2, tie_word_embeddings=True),
    "qwen2_5_math_7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                            num_heads=28, num_kv_heads=4, rope_theta=10000.0, max_position_embeddings=4096),
}


@dataclasses.dataclass(frozen=True)
class Qwen2Config(Runtime):
    """The model's shape (plus, keyword-only, the `Runtime` fields: dtypes, remat, attention kernel)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # default hidden_size // num_heads
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768

    def __post_init__(self):
        super().__post_init__()
        if self.num_heads % self.num_kv_heads:
            raise InputError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def replace(self, **kw) -> "Qwen2Config":
        return dataclasses.replace(self, **kw)

    @classmethod
    def preset(cls, name: str, **overrides) -> "Qwen2Config":
        """The named shape of `PRESETS`, with `overrides` (any fields) on top."""
        if name not in PRESETS:
            raise InputError(f"model preset {name!r}: expected one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # -- Hugging Face config.json ----------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json", **overrides) -> "Qwen2Config":
        """Build from a transformers Qwen2 config dict; refuse what this port does not implement."""
        def need(key):
            if key not in hf:
                raise InputError(f"{source}: missing key {key!r}")
            return hf[key]

        if hf.get("model_type") not in ("qwen2", None):
            raise InputError(f"{source}: key 'model_type' is {hf.get('model_type')!r}; only 'qwen2' is supported")
        if hf.get("use_sliding_window"):
            raise InputError(f"{source}: key 'use_sliding_window' is true; sliding-window attention is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise InputError(f"{source}: key 'hidden_act' is {hf['hidden_act']!r}; only 'silu' is supported")
        if hf.get("rope_scaling"):
            raise InputError(f"{source}: key 'rope_scaling' is set ({hf['rope_scaling']!r}); only plain RoPE is supported")
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise InputError(f"{source}: key 'rope_parameters.rope_type' is {rope['rope_type']!r}; "
                             "only 'default' RoPE is supported")
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        head_dim = hf.get("head_dim")
        kw = dict(
            vocab_size=need("vocab_size"), hidden_size=hidden, intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"), num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=None if head_dim in (None, hidden // heads) else head_dim,
            rope_theta=float(theta), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_size,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
            "sliding_window": None,
            "attention_dropout": 0.0,
            "torch_dtype": self.param_dtype,
        }
