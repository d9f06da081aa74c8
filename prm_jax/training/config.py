"""Training configuration: one frozen dataclass per concern, loadable from YAML, overridable with
`--set key=value` (a bare field name such as `lr`, or `section.field` such as `optim.lr`).

YAML layout (every key optional; unknown keys are errors):

    model: {preset, overrides, tokenizer, dtype, param_dtype, remat, remat_saves, attention_impl}
    data:  {max_length, batch_size, pack, buckets, group_by_length, step_token, system_prompt}
    optim: {lr, warmup_steps, min_lr_ratio, weight_decay, b1, b2, eps, clip_norm, accum_steps}
    run:   {steps, seed, mesh, log_every, eval_every, eval_batch_size, save_every, keep, peak_flops, export_hf}
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

import yaml

from prm_jax.data.prm_format import DEFAULT_STEP_TOKEN, DEFAULT_SYSTEM_PROMPT
from prm_jax.errors import InputError
from prm_jax.models.config import PRESETS
from prm_jax.models.runtime import Runtime


def _check(cfg: Any, key: str, ok: bool, expected: str) -> None:
    """Settings are checked when a config is built, so a bad value fails before any work (not after an hour
    of training, nor silently: lr=-1 would train uphill, steps=0 would "complete" and export an untrained model)."""
    if not ok:
        raise InputError(f"{key}: expected {expected}, got {getattr(cfg, key)!r}")


def _one_of(cfg: Any, key: str, choices: tuple[str, ...]) -> None:
    _check(cfg, key, getattr(cfg, key) in choices, f"one of {', '.join(choices)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(Runtime):
    """The model to train; the runtime fields (dtype, param_dtype, remat, remat_saves, attention_impl)
    and their checks are `Runtime`'s, carried onto the model's Qwen2Config."""
    preset: str | None = None  # fresh model: a name of models.config.PRESETS (no --init)
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # Qwen2Config fields of a fresh model
    tokenizer: str | None = None  # tokenizer dir (default: the --init dir)
    attention_impl: str = "auto"  # training's default: cuDNN flash attention where it applies (Runtime: "xla")

    def __post_init__(self):
        if self.preset is not None:
            _one_of(self, "preset", tuple(PRESETS))
        super().__post_init__()


@dataclasses.dataclass(frozen=True)
class DataConfig:
    max_length: int = 2048
    batch_size: int = 8  # sequences (rows) per optimizer step, all accumulation micro-batches together
    pack: bool = False  # first-fit packing with segment ids instead of padding to buckets
    buckets: tuple[int, ...] = ()  # padded lengths; () = prm_jax.buckets.coarse_buckets(max_length)
    group_by_length: int = 0  # W > 0: batch rows of similar length within each window of W batches (less padding)
    step_token: str = DEFAULT_STEP_TOKEN
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT

    def __post_init__(self):
        _check(self, "max_length", self.max_length >= 1, ">= 1")
        _check(self, "batch_size", self.batch_size >= 1, ">= 1")
        _check(self, "buckets", all(b >= 1 for b in self.buckets), "lengths >= 1")
        _check(self, "group_by_length", self.group_by_length >= 0, ">= 0 (0 = off)")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays from lr to lr * min_lr_ratio at run.steps
    weight_decay: float = 0.0  # AdamW decoupled decay; applied to matrices only (not biases / norms)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0  # global-norm clipping (None = off)
    accum_steps: int = 1  # gradient accumulation micro-batches per step
    class_balance: bool = False  # PRM objectives: weight wrong/right steps by inverse frequency in the train file

    def __post_init__(self):
        finite = math.isfinite
        _check(self, "lr", finite(self.lr) and self.lr > 0, "> 0")
        _check(self, "warmup_steps", self.warmup_steps >= 0, ">= 0")
        _check(self, "min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "within [0, 1]")
        _check(self, "weight_decay", finite(self.weight_decay) and self.weight_decay >= 0, ">= 0")
        _check(self, "b1", 0 <= self.b1 < 1, "within [0, 1)")
        _check(self, "b2", 0 <= self.b2 < 1, "within [0, 1)")
        _check(self, "eps", finite(self.eps) and self.eps > 0, "> 0")
        _check(self, "clip_norm", self.clip_norm is None or (finite(self.clip_norm) and self.clip_norm >= 0),
               ">= 0 (0 or null = no clipping)")
        _check(self, "accum_steps", self.accum_steps >= 1, ">= 1")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    steps: int = 1000
    seed: int = 0  # data shuffle and the init of fresh weights (score head, fresh models)
    mesh: str | None = None  # "data=2,fsdp=2,tensor=2"; None = all devices on data
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end (when an eval file is given)
    eval_batch_size: int = 0  # 0 = the micro-batch size
    save_every: int = 500
    keep: int = 3  # checkpoints kept
    peak_flops: float | None = None  # per-device peak FLOP/s for MFU; None = from the device kind
    export_hf: bool = True  # write OUT/hf at the end

    def __post_init__(self):
        _check(self, "steps", self.steps >= 1, ">= 1")
        _check(self, "seed", self.seed >= 0, ">= 0")
        _check(self, "log_every", self.log_every >= 1, ">= 1")
        _check(self, "eval_every", self.eval_every >= 0, ">= 0 (0 = only at the end)")
        _check(self, "eval_batch_size", self.eval_batch_size >= 0, ">= 0 (0 = the micro-batch size)")
        _check(self, "save_every", self.save_every >= 0, ">= 0 (0 = only at the end)")
        _check(self, "keep", self.keep >= 1, ">= 1")
        _check(self, "peak_flops", self.peak_flops is None or self.peak_flops > 0, "> 0 or null")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def __post_init__(self):
        if self.optim.warmup_steps > self.run.steps:
            raise InputError(f"optim.warmup_steps: expected <= run.steps ({self.run.steps}), "
                             f"got {self.optim.warmup_steps}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTION_CLASSES = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "run": RunConfig}


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check/convert a YAML value to a field's annotated type; errors name the key (`where`)."""
    hint = annotation
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where)
            except ValueError as e:
                errors.append(str(e))
        raise InputError(errors[0] if errors else f"{where}: bad value {value!r}")
    if hint is Any:
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{where}: expected a list, got {value!r}")
        return tuple(coerce(v, args[0], where) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise InputError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise InputError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _section(cls, values: dict[str, Any], where: str):
    hints = typing.get_type_hints(cls)
    kw = {}
    for k, v in values.items():
        if k not in hints:
            raise InputError(f"{where}: unknown key {k!r}; expected one of {', '.join(hints)}")
        kw[k] = coerce(v, hints[k], f"{where}.{k}")
    try:
        return cls(**kw)
    except ValueError as e:  # a range check in __post_init__: name the source and section too
        raise InputError(f"{where}.{e}") from None


def from_dict(d: dict[str, Any] | None, source: str = "config") -> TrainConfig:
    d = d or {}
    if not isinstance(d, dict):
        raise InputError(f"{source}: expected a mapping with sections {', '.join(_SECTION_CLASSES)}")
    for k in d:
        if k not in _SECTION_CLASSES:
            raise InputError(f"{source}: unknown section {k!r}; expected one of {', '.join(_SECTION_CLASSES)}")
    sections = {name: _section(cls, d.get(name) or {}, f"{source}:{name}") for name, cls in _SECTION_CLASSES.items()}
    try:
        return TrainConfig(**sections)
    except ValueError as e:
        raise InputError(f"{source}:{e}") from None


def load_config(path: str | None) -> TrainConfig:
    if not path:
        return TrainConfig()
    with open(path, encoding="utf-8") as f:
        return from_dict(yaml.safe_load(f), source=path)


def resolve_key(key: str) -> tuple[str, str]:
    """`lr` -> ("optim", "lr"); `optim.lr` -> ("optim", "lr"). Errors on unknown/ambiguous names."""
    if "." in key:
        section, _, name = key.partition(".")
        if section not in _SECTION_CLASSES or name not in {f.name for f in dataclasses.fields(_SECTION_CLASSES[section])}:
            raise InputError(f"--set {key}: unknown key")
        return section, name
    hits = [s for s, cls in _SECTION_CLASSES.items() if key in {f.name for f in dataclasses.fields(cls)}]
    if not hits:
        raise InputError(f"--set {key}: unknown key")
    if len(hits) > 1:
        raise InputError(f"--set {key}: ambiguous, write one of {', '.join(f'{s}.{key}' for s in hits)}")
    return hits[0], key


def apply_overrides(cfg: TrainConfig, assignments: list[str] | None) -> TrainConfig:
    """Apply `key=value` strings (values parsed as YAML: 3e-6, true, [128, 256], null)."""
    d = cfg.to_dict()
    for a in assignments or []:
        key, sep, text = a.partition("=")
        if not sep:
            raise InputError(f"--set {a!r}: expected key=value")
        section, name = resolve_key(key.strip())
        d[section][name] = yaml.safe_load(text) if text.strip() else None
    return from_dict(d, source="--set")
