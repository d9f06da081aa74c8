"""Device mesh with axes (data, fsdp, tensor) and the one table that maps logical parameter
axes onto it.

Every parameter carries `logical_axes` metadata (e.g. ("embed", "mlp")). `RULES` says which
mesh axes each logical axis is split over; a split that does not divide the dimension is
dropped (replicated) rather than failing, so tiny test models run on any mesh.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prm_jax.errors import InputError

AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes it is sharded over (None = replicated).
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "norm": None,
    "classes": None,
    "length": None,
}


def parse_mesh_spec(spec: str | None, n_devices: int) -> dict[str, int]:
    """`"data=2,fsdp=2,tensor=2"` -> sizes; one axis may be -1 (fills the rest); missing axes are 1.
    None or "" means all devices on `data`."""
    sizes = {a: 1 for a in AXES}
    if not spec:
        sizes["data"] = n_devices
        return sizes
    fill = None
    for part in spec.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in sizes or not value.strip().lstrip("-").isdigit():
            raise InputError(f"mesh spec {spec!r}: expected comma-separated {'|'.join(AXES)}=N, got {part!r}")
        size = int(value)
        if size == -1:
            if fill is not None:
                raise InputError(f"mesh spec {spec!r}: only one axis may be -1")
            fill = name
        elif size < 1:
            raise InputError(f"mesh spec {spec!r}: axis {name} must be >= 1 or -1")
        else:
            sizes[name] = size
    fixed = math.prod(v for k, v in sizes.items() if k != fill)
    if fill is not None:
        if n_devices % fixed:
            raise InputError(f"mesh spec {spec!r}: {n_devices} devices do not divide by {fixed}")
        sizes[fill] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise InputError(f"mesh spec {spec!r} uses {math.prod(sizes.values())} devices, but {n_devices} are present")
    return sizes


def make_mesh(spec: str | tuple[int, int, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh over `devices` (default: all) with axes (data, fsdp, tensor)."""
    devices = list(devices if devices is not None else jax.devices())
    if isinstance(spec, tuple):
        sizes = dict(zip(AXES, spec))
        if math.prod(spec) != len(devices):
            raise InputError(f"mesh shape {spec} needs {math.prod(spec)} devices, {len(devices)} present")
    else:
        sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    try:
        arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # CPU / odd topologies: plain row-major order is fine
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, AXES)


def logical_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                 rules: dict[str, tuple[str, ...] | None] = RULES) -> P:
    """PartitionSpec for an array with these logical axis names, dropping splits that don't divide."""
    if names is None:
        return P()
    used: set[str] = set()
    out = []
    for name, dim in zip(names, shape):
        axes = rules.get(name) if name else None
        if axes is None:
            out.append(None)
            continue
        keep = []
        for a in axes:
            size = mesh.shape[a]
            if size > 1 and a not in used and dim % (math.prod(mesh.shape[k] for k in keep) * size) == 0:
                keep.append(a)
        used.update(keep)
        out.append(tuple(keep) if len(keep) > 1 else (keep[0] if keep else None))
    return P(*out)


def state_shardings(state: Any, mesh: Mesh, rules=RULES) -> Any:
    """NamedSharding for every Variable in an nnx State (by its `logical_axes` metadata)."""
    def one(v):
        names = v.get_metadata().get("logical_axes") if isinstance(v, nnx.Variable) else None
        shape = v.get_value().shape if isinstance(v, nnx.Variable) else v.shape
        return NamedSharding(mesh, logical_spec(names, shape, mesh, rules))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Shard the leading (batch) axis over data+fsdp, replicate the rest."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def shard_batch(x: Any, mesh: Mesh | None) -> Any:
    """Place a host batch (pytree of arrays) on the mesh, batch axis split over data+fsdp.
    The batch size must divide by data*fsdp."""
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, x)
    return jax.tree.map(lambda a: jax.device_put(np.asarray(a), batch_sharding(mesh, np.ndim(a))), x)


def create_sharded(ctor: Callable[[], nnx.Module], mesh: Mesh | None, rules=RULES) -> nnx.Module:
    """Build a module directly in its sharded layout: shapes are traced abstractly, then one jit
    creates every parameter on its own devices (no full single-device copy first)."""
    if mesh is None:
        return ctor()
    abstract = nnx.eval_shape(ctor)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    init = jax.jit(lambda: nnx.state(ctor()), out_shardings=shardings)
    return nnx.merge(graphdef, init())


def initialize_distributed() -> tuple[int, int]:
    """Call jax.distributed.initialize on multi-host runs (TPU pods, multi-node GPU).

    On TPU the coordinator is discovered automatically; elsewhere set JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID. Single-host runs are left alone.
    Returns (process_index, process_count)."""
    multi = any(os.environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID"))
    if multi and not jax.distributed.is_initialized():
        jax.distributed.initialize()
    return jax.process_index(), jax.process_count()
