"""Device mesh with axes (data, fsdp, tensor) and the one table that maps logical parameter
axes onto it.

Every parameter carries `logical_axes` metadata (e.g. ("embed", "mlp")). `RULES` says which
mesh axes each logical axis is split over; a split that does not divide the dimension is
dropped (replicated) rather than failing, so tiny test models run on any mesh.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prm_jax.errors import InputError, RunError
from prm_jax.flags import nonneg_int, positive_int

log = logging.getLogger(__name__)

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


def mesh_devices(spec: str | None, devices: Sequence[Any] | None = None) -> list:
    """The devices a mesh spec uses: a spec without -1 that names fewer devices than are present
    (e.g. "fsdp=2" on 8) takes the first ones; otherwise all of them (make_mesh checks the spec)."""
    devices = list(devices if devices is not None else jax.devices())
    if spec and "-1" not in spec:
        sizes = [part.partition("=")[2].strip() for part in spec.split(",")]
        if all(s.isdigit() for s in sizes) and math.prod(int(s) for s in sizes) < len(devices):
            return devices[:math.prod(int(s) for s in sizes)]
    return devices


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


def batch_sharding(mesh: Mesh, ndim: int, axis: int = 0) -> NamedSharding:
    """Shard array axis `axis` (the batch) over the rules' `batch` mesh axes, replicate the rest."""
    spec: list = [None] * ndim
    spec[axis] = RULES["batch"]
    return NamedSharding(mesh, P(*spec))


def batch_ways(mesh: Mesh | None) -> int:
    """How many shards a batch is split into (1 without a mesh)."""
    return 1 if mesh is None else math.prod(mesh.shape[a] for a in RULES["batch"])


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


# The standard environment of a multi-process run (read by jax.distributed.initialize too).
DIST_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# Variables by which JAX's cluster auto-detection recognises a TPU pod slice or a SLURM allocation.
CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID")


def add_distributed_flags(parser) -> None:
    """--coordinator / --num-processes / --process-id, the one way every computing stage starts a multi-process run."""
    g = parser.add_argument_group(
        "multi-process run (jax.distributed)",
        "every process runs the same command with its own --process-id; without these flags the standard "
        f"environment ({', '.join(DIST_ENV)}) is read, else JAX's cluster auto-detection (TPU pod slices, SLURM)")
    g.add_argument("--coordinator", metavar="HOST:PORT", type=_host_port, default=None,
                   help="address of process 0's coordination service (the same on every process)")
    g.add_argument("--num-processes", metavar="N", type=positive_int, default=None, help="processes in the run")
    g.add_argument("--process-id", metavar="I", type=nonneg_int, default=None, help="this process, 0..N-1")


def _host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 10.0.0.2:8476), got {text!r}")
    return text


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    """How this process joins a run: explicit (flags or environment), or `auto` (JAX's cluster detection)."""
    source: str  # "flags" | "environment" | "auto"
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def distributed_spec(args: Any = None, environ: Mapping[str, str] | None = None) -> DistributedSpec | None:
    """The flags if any is given, else the JAX_* environment, else `auto` on a TPU pod / SLURM job, else None
    (one process). A partial or inconsistent spec is an InputError naming what is missing or wrong."""
    environ = os.environ if environ is None else environ
    flags = {k: getattr(args, k, None) for k in ("coordinator", "num_processes", "process_id")}
    if any(v is not None for v in flags.values()):
        missing = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is None]
        if missing:
            raise InputError(f"a multi-process run needs --coordinator, --num-processes and --process-id "
                             f"together; missing {', '.join(missing)}")
        spec = DistributedSpec("flags", flags["coordinator"], flags["num_processes"], flags["process_id"])
    elif environ.get("JAX_COORDINATOR_ADDRESS"):
        values = {}
        for key in DIST_ENV[1:]:
            text = environ.get(key, "")
            if not text.strip().isdigit():
                raise InputError(f"JAX_COORDINATOR_ADDRESS is set, so {key} must be a non-negative integer; "
                                 f"got {text!r}")
            values[key] = int(text)
        spec = DistributedSpec("environment", environ["JAX_COORDINATOR_ADDRESS"], values["JAX_NUM_PROCESSES"],
                               values["JAX_PROCESS_ID"])
    elif any(environ.get(k) for k in CLUSTER_ENV):
        return DistributedSpec("auto")
    else:
        return None
    if spec.num_processes < 1 or not 0 <= spec.process_id < spec.num_processes:
        raise InputError(f"process id {spec.process_id} (from {spec.source}) must be in 0..{spec.num_processes - 1}")
    return spec


def initialize_distributed(args: Any = None) -> tuple[int, int]:
    """Join a multi-process run through jax.distributed.initialize, as `distributed_spec` says; a run of one
    process is left alone. Must come before anything touches a JAX device. On CPU the processes talk through
    JAX's CPU collectives (gloo), so N processes on one machine form one mesh over all their devices.
    Idempotent (a second stage in the same process reuses the first's runtime). Returns
    (process_index, process_count)."""
    spec = distributed_spec(args)
    if spec is not None and spec.num_processes != 1 and not jax.distributed.is_initialized():
        if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # no effect on GPU/TPU devices
        try:
            jax.distributed.initialize(coordinator_address=spec.coordinator, num_processes=spec.num_processes,
                                       process_id=spec.process_id)
        except Exception as e:  # a coordinator that never answers, a port in use, a bad cluster environment
            where = f"coordinator {spec.coordinator}" if spec.coordinator else "JAX's cluster auto-detection"
            raise RunError(f"could not join the multi-process run ({spec.source}, {where}): "
                           f"{' '.join(str(e).split())[:300]}") from e
        log.info("process %d of %d (%s): %d local devices, %d in all", jax.process_index(), jax.process_count(),
                 spec.source, jax.local_device_count(), jax.device_count())
    return jax.process_index(), jax.process_count()
