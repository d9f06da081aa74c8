"""Attention kernels XLA:CPU has no fast form of, as XLA FFI custom calls (cpu_attention.cc):
- `attention_bf16`: masked attention in bf16 (scoring, a bf16 full forward). XLA:CPU runs it as ~8
  separate passes over the f32 scores of every query block; the kernel makes one, keeps each tile of
  queries in cache, uses AVX-512 BF16 dot products and never touches fully masked keys. It computes
  what `models.attention.attention` computes without a gradient (equal up to the last bf16 bit of a
  few outputs: its exp and sums round differently).
- `decode_f32`: one query per row against the f32 KV cache (the sampler's decode step on CPU), as
  `models.attention.decode_attention`: it reads only the cache's filled part, once.

It is compiled on first use with the system's C++ compiler ($CXX, else g++) against jaxlib's FFI
headers, into $PRM_JAX_KERNEL_CACHE (default ~/.cache/prm_jax/kernels), once per source and jaxlib
version. Where it cannot be used (not x86 Linux, a CPU without AVX-512 BF16, no compiler, a failed
build, PRM_JAX_CPU_KERNELS=0) the model keeps XLA's attention, which computes the same function; the
reason is logged once.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_attention.cc")
TARGETS = {"attention_bf16": "PrmAttentionBf16", "decode_f32": "PrmDecodeAttentionF32"}
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
         "-mavx512bf16")


@functools.lru_cache(maxsize=None)
def cpu_has_flag(flag: str) -> bool:
    """Whether this machine's CPU lists `flag` (e.g. avx512_bf16, amx_bf16) in /proc/cpuinfo (Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        return False


def _build(cache_dir: str) -> str:
    """The compiled library's path (built now unless this source and jaxlib already have one)."""
    with open(SOURCE, "rb") as f:
        source = f.read()
    cxx = os.environ.get("CXX", "g++")
    key = hashlib.sha256(source + jaxlib.__version__.encode() + " ".join((cxx, *FLAGS)).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"cpu_attention-{key}.so")
    if os.path.exists(path):
        return path
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler {cxx!r} on PATH")
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)  # then renamed: concurrent builds never see half a file
    os.close(fd)
    try:
        run = subprocess.run([cxx, *FLAGS, "-I", jax.ffi.include_dir(), SOURCE, "-o", tmp],
                             capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {run.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether the kernels are built, loaded and registered with XLA for this process."""
    if os.environ.get("PRM_JAX_CPU_KERNELS", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.machine() != "x86_64" or not cpu_has_flag("avx512_bf16"):
        log.info("CPU attention kernels not used: they need x86 Linux with AVX-512 BF16")
        return False
    cache_dir = os.environ.get("PRM_JAX_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                         "prm_jax", "kernels")
    try:
        lib = ctypes.cdll.LoadLibrary(_build(cache_dir))
    except (OSError, RuntimeError) as e:
        log.warning("CPU attention kernels not used (XLA's attention instead): the build failed: %s", e)
        return False
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(f"prm_jax_{target}", jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return True


def attention_applies(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Whether `attention_bf16` serves these operands here: bf16 on the CPU backend, head size a
    multiple of 32, and the kernel available."""
    bf16 = all(x.dtype == jnp.bfloat16 for x in (q, k, v))
    return bf16 and q.shape[-1] % 32 == 0 and jax.default_backend() == "cpu" and available()


def decode_applies(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Whether `decode_f32` serves these operands here: one f32 query per row on the CPU backend, head
    size a multiple of 32, at most 8 query heads per kv head, and the kernel available."""
    f32 = all(x.dtype == jnp.float32 for x in (q, k, v))
    shapes = q.shape[1] == 1 and q.shape[-1] % 32 == 0 and q.shape[2] // k.shape[1] <= 8
    return f32 and shapes and jax.default_backend() == "cpu" and available()


def _batch_shardings(mesh, arg_shapes):
    """Every operand split along the rows as q is, and whole along the other axes."""
    spec = arg_shapes[0].sharding.spec
    batch = spec[0] if len(spec) else None
    return [NamedSharding(mesh, P(batch, *[None] * (len(a.shape) - 1))) for a in (*arg_shapes, arg_shapes[0])]


def _rows_apart(target: str):
    """The FFI call `target`(q, k, v, mask) -> like q. Rows are independent, so on a mesh each device
    runs its own rows (without this, XLA would gather every row onto every device)."""
    def call(q, k, v, mask):
        return jax.ffi.ffi_call(f"prm_jax_{target}", jax.ShapeDtypeStruct(q.shape, q.dtype),
                                vmap_method="sequential")(q, k, v, mask)

    def partition(mesh, arg_shapes, result_shape):
        *args, out = _batch_shardings(mesh, arg_shapes)
        return mesh, call, out, tuple(args)

    apart = custom_partitioning(call)
    apart.def_partition(
        partition=partition, infer_sharding_from_operands=lambda mesh, args, out: _batch_shardings(mesh, args)[-1],
        sharding_rule="b t h d, b k s d, b k s d, b t s -> b t h d", need_replication_factors=("t", "h", "d", "k", "s"))
    return apart


_attention_bf16, _decode_f32 = _rows_apart("attention_bf16"), _rows_apart("decode_f32")


def attention_bf16(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B,T,H,D] already scaled by 1/sqrt(D), k/v [B,K,S,D], mask [B,T,S] bool -> [B,T,H,D], all bf16
    (softmax in f32, normalised after the value product, as `models.attention.attention`)."""
    return _attention_bf16(q, k, v, mask)


def decode_f32(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B,1,H,D] already scaled by 1/sqrt(D), k/v [B,K,S,D], mask [B,1,S] bool -> [B,1,H,D], all f32
    (as `models.attention.decode_attention`)."""
    return _decode_f32(q, k, v, mask)
