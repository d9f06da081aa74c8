"""Hugging Face interop: load and save Qwen2 policies and PRMs as safetensors directories.

Loading streams tensor by tensor straight into the target sharding: the model is first built
abstractly (`nnx.eval_shape`, no memory), then every parameter is created with
`jax.make_array_from_callback`, whose callback reads from disk only the slice a device needs,
row-chunk by row-chunk, into a fresh 64-byte-aligned buffer (which the CPU backend adopts
without a copy). The host never holds the whole model beyond what the devices themselves hold.

The safetensors container (8-byte little-endian header length, JSON header, raw row-major
bytes) is read and written here directly rather than through the `safetensors` package, because
its numpy backend has no bfloat16 and cannot read a sub-slice into a buffer of our choosing.

Name mapping (ours -> HF): `a.b.kernel` -> `a.b.weight` transposed ([in,out] vs torch's
[out,in]); `scale`/`embedding` -> `weight`; PRM `score.dense_in`/`score.dense_out` ->
`score.0`/`score.2` (the Qwen2.5-Math-PRM layout). Tied embeddings have no `lm_head`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from tqdm.auto import tqdm

from prm_jax.errors import InputError
from prm_jax.models import qwen_vocab as qv
from prm_jax.models.architectures import ARCHITECTURES, HF_ARCHITECTURES, arch_of
from prm_jax.models.config import Qwen2Config
from prm_jax.models.prm import Qwen2PRM
from prm_jax.models.qwen2 import Qwen2ForCausalLM
from prm_jax.models.runtime import DTYPES
from prm_jax.parallel.mesh import make_mesh, state_shardings

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "tokenizer.model")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
# A PRM export carries our transformers modeling file; auto_map makes AutoModel(ForTokenClassification)
# .from_pretrained(dir, trust_remote_code=True) build the PRM from it (no transformers class is one).
MODELING_FILE = "modeling_prm_jax.py"
PRM_AUTO_MAP = {"AutoModel": "modeling_prm_jax.Qwen2ForProcessRewardModel",
                "AutoModelForTokenClassification": "modeling_prm_jax.Qwen2ForProcessRewardModel"}
_READ_CHUNK_BYTES = 16 * 2**20  # transient host buffer per read
_PROGRESS_BYTES = 2**28  # show a progress bar for checkpoints above this size
_ALIGN = 64  # the CPU backend adopts numpy buffers aligned like this without copying

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class CheckpointError(InputError):
    """A checkpoint file is missing, corrupt, or does not fit the model; the message names file and key."""


# -- safetensors container ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorEntry:
    file: Path
    key: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Entries of one .safetensors file (validated against the file size) and its __metadata__."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: corrupt safetensors file (only {size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise CheckpointError(f"{path}: corrupt safetensors file "
                                  f"(header length {n} does not fit a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_len = 8 + n, size - 8 - n
    entries = {}
    for key, info in header.items():
        try:
            dtype = np.dtype(_ST_DTYPES[info["dtype"]])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {key!r}: bad header entry {info!r} ({e!r})") from None
        if not 0 <= begin <= end <= data_len or end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {key!r}: data_offsets {[begin, end]} do not match shape {shape} "
                                  f"{info['dtype']} within {data_len} data bytes (truncated or corrupt file)")
        entries[key] = TensorEntry(path, key, dtype, shape, data_start + begin)
    return entries, metadata


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    raw = np.empty(n + _ALIGN, np.uint8)
    off = (-raw.ctypes.data) % _ALIGN
    return raw[off:off + n].view(dtype).reshape(shape)


def _read_rows(f, entry: TensorEntry, r0: int, r1: int) -> np.ndarray:
    """Rows r0:r1 (along axis 0) of a tensor, read straight from the file."""
    row_shape = entry.shape[1:]
    row_bytes = math.prod(row_shape) * entry.dtype.itemsize
    buf = np.empty((r1 - r0, *row_shape), entry.dtype)
    f.seek(entry.offset + r0 * row_bytes)
    got = f.readinto(memoryview(buf.reshape(-1).view(np.uint8)))
    if got != buf.nbytes:
        raise CheckpointError(f"{entry.file}: tensor {entry.key!r}: file ends early (read {got} of {buf.nbytes} bytes)")
    return buf


def _as_range(s: slice | None, n: int) -> range:
    return range(*(s or slice(None)).indices(n))


def read_slice(f, entry: TensorEntry, index: tuple[slice, ...] | None, transpose: bool, dtype) -> np.ndarray:
    """The part `index` (in our layout: the transpose of HF's when `transpose`) of a 1-D or 2-D tensor,
    converted to `dtype`, in a fresh aligned buffer. Reads a few MB at a time."""
    if len(entry.shape) not in (1, 2) or (transpose and len(entry.shape) != 2):
        raise CheckpointError(f"{entry.file}: tensor {entry.key!r}: unexpected rank {len(entry.shape)}")
    ours = entry.shape[::-1] if transpose else entry.shape
    index = tuple(index or ()) + (slice(None),) * (len(ours) - len(index or ()))
    ranges = [_as_range(s, n) for s, n in zip(index, ours)]
    out = _aligned_empty(tuple(len(r) for r in ranges), dtype)
    if any(r.step != 1 for r in ranges):
        raise CheckpointError(f"{entry.file}: tensor {entry.key!r}: strided shard index {index} not supported")
    if len(ours) == 1:
        out[:] = _read_rows(f, entry, ranges[0].start, ranges[0].stop)
        return out
    # HF rows = our axis 1 when transposed, else our axis 0.
    rows, cols = (ranges[1], ranges[0]) if transpose else (ranges[0], ranges[1])
    step = max(1, _READ_CHUNK_BYTES // max(1, entry.shape[1] * entry.dtype.itemsize))
    c = slice(cols.start, cols.stop)
    for r0 in range(rows.start, rows.stop, step):
        r1 = min(rows.stop, r0 + step)
        block = _read_rows(f, entry, r0, r1)[:, c]
        if transpose:
            out[:, r0 - rows.start:r1 - rows.start] = block.T
        else:
            out[r0 - rows.start:r1 - rows.start] = block
    return out


def write_safetensors(path: str | os.PathLike, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, Any]]) -> None:
    """Write a .safetensors file; `tensors` yields (key, shape, dtype, fetch) and `fetch()` is only called when
    that tensor's bytes are written, so one tensor at a time is materialised."""
    tensors = list(tensors)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for key, shape, dtype, _ in tensors:
        n = math.prod(shape) * np.dtype(dtype).itemsize
        header[key] = {"dtype": _ST_NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned, as the reference writer does
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, shape, dtype, fetch in tensors:
            arr = np.ascontiguousarray(fetch(), dtype=dtype)
            if arr.shape != tuple(shape):
                raise ValueError(f"{path}: tensor {key!r} has shape {arr.shape}, planned {tuple(shape)}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
    os.replace(tmp, path)


# -- checkpoint directory --------------------------------------------------------------------

def read_config(path: str | os.PathLike) -> dict[str, Any]:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: not found (expected a Hugging Face model directory)")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object")
    return hf


def checkpoint_entries(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """All tensors of a directory: `model.safetensors`, or the shards listed in `model.safetensors.index.json`."""
    path = Path(path)
    index_file, single = path / INDEX_FILE, path / SINGLE_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file}: corrupt index, expected a JSON object with key "
                                  f"'weight_map' ({e!r})") from None
        entries: dict[str, TensorEntry] = {}
        by_file: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            by_file.setdefault(fname, []).append(key)
        for fname, keys in by_file.items():
            shard = path / fname
            if not shard.is_file():
                raise CheckpointError(f"{index_file}: key {keys[0]!r} maps to shard {fname!r}, which is missing")
            found, _ = read_safetensors_header(shard)
            for key in keys:
                if key not in found:
                    raise CheckpointError(f"{shard}: tensor {key!r} is listed in {INDEX_FILE} but not in the file")
                entries[key] = found[key]
        return entries
    if single.is_file():
        return read_safetensors_header(single)[0]
    hint = " (only PyTorch .bin weights found; convert them to safetensors)" if any(path.glob("*.bin")) else ""
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def hf_key(path: tuple) -> tuple[str, bool]:
    """Our parameter path -> (HF tensor name, whether the kernel is transposed)."""
    parts = [str(p) for p in path]
    leaf = parts[-1]
    parts[-1] = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    parts = [{"dense_in": "0", "dense_out": "2"}.get(p, p) for p in parts]
    return ".".join(parts), leaf == "kernel"


def _is_prm_checkpoint(hf: dict, entries: dict) -> bool:
    return HF_ARCHITECTURES["prm"] in (hf.get("architectures") or []) or "score.0.weight" in entries


def _stored_dtype(hf: dict, entries: dict[str, TensorEntry]) -> str:
    name = hf.get("dtype") or hf.get("torch_dtype")
    if isinstance(name, str) and name in DTYPES:
        return name
    floats = [e.dtype for e in entries.values() if np.issubdtype(e.dtype, np.floating) or e.dtype == jnp.bfloat16]
    name = np.dtype(floats[0]).name if floats else "float32"
    return name if name in DTYPES else "float32"  # float64: what jax (without x64) computes it in anyway


def has_tokenizer(path: str | os.PathLike) -> bool:
    return any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer stored in a local model directory (never downloads)."""
    from transformers import AutoTokenizer

    if not has_tokenizer(path):
        raise CheckpointError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def check_step_token(path: str | os.PathLike, hf: dict[str, Any], tokenizer=None) -> None:
    """Refuse a PRM whose tokenizer would put the step token elsewhere than the model scores, which would make
    every step reward silently wrong: config.json's `step_token_id` (written by save_hf) must be the tokenizer's
    id of the step token, and a checkpoint in the official vocabulary (Qwen2.5's added-token table, the released
    Qwen2.5-Math-PRM's) must have `<extra_0>` at 151651."""
    tokenizer = tokenizer or load_tokenizer(path)
    name = hf.get("step_token") or qv.STEP_TOKEN
    got = tokenizer.get_vocab().get(name)
    want = hf.get("step_token_id")
    if want is not None and got != want:
        raise CheckpointError(f"{Path(path) / 'config.json'}: step_token_id is {want}, but the tokenizer maps "
                              f"{name!r} to {got}; this tokenizer does not belong to the checkpoint")
    if qv.is_official_vocabulary(tokenizer) and got != qv.OFFICIAL_STEP_TOKEN_ID:
        raise CheckpointError(f"{path}: tokenizer maps {name!r} to {got}, but a PRM in the official Qwen2.5 "
                              f"vocabulary scores at {qv.OFFICIAL_STEP_TOKEN_ID} ('<extra_0>', renamed from "
                              f"'<|quad_end|>'); this tokenizer does not belong to the checkpoint")


def _resolve_mesh(mesh) -> Mesh | None:
    return mesh if mesh is None or isinstance(mesh, Mesh) else make_mesh(mesh)


def load(path: str | os.PathLike, arch: str, mesh=None, dtype=None, *, param_dtype=None,
         seed: int = 0) -> nnx.Module:
    """The model of architecture `arch` ("prm" | "lm", see `architectures`) from a Hugging Face
    directory: `load_prm` or `load_causal_lm`."""
    path = Path(path)
    hf = read_config(path)
    entries = checkpoint_entries(path)
    is_prm = _is_prm_checkpoint(hf, entries)
    if arch == "lm" and is_prm:
        raise CheckpointError(f"{path / 'config.json'}: key 'architectures' is {hf.get('architectures')}: a PRM "
                              "checkpoint has no LM head; load it with load_prm")
    param_dtype = str(np.dtype(param_dtype or _stored_dtype(hf, entries)))
    cfg = Qwen2Config.from_hf(hf, source=str(path / "config.json"), param_dtype=param_dtype,
                              dtype=str(np.dtype(dtype or param_dtype)))
    if arch == "prm" and is_prm and has_tokenizer(path):
        check_step_token(path, hf)
    mesh = _resolve_mesh(mesh)

    model_cls = ARCHITECTURES[arch]
    graphdef, state = nnx.split(nnx.eval_shape(lambda: model_cls(cfg, nnx.Rngs(seed))))
    if mesh is not None:
        sharding_of = dict(nnx.to_flat_state(state_shardings(state, mesh))).__getitem__
    else:
        single = SingleDeviceSharding(jax.local_devices()[0])
        sharding_of = lambda p: single  # noqa: E731

    fresh: dict[tuple, Any] = {}
    if arch == "prm" and not is_prm:  # a PRM started from a policy: new score head, LM head dropped
        log.info("%s is a causal-LM checkpoint: loading the backbone, initialising the score head (seed %d)",
                 path, seed)
        fresh = _fresh_head(state, seed, sharding_of)

    files: dict[Path, Any] = {}
    used: set[str] = set()
    flat = []
    params = nnx.to_flat_state(state)
    show = sum(e.nbytes for e in entries.values()) > _PROGRESS_BYTES
    try:
        for p, var in tqdm(params, desc=f"loading {path.name}", unit="tensor", disable=not show, leave=False):
            if p in fresh:
                flat.append((p, fresh[p]))
                continue
            key, transpose = hf_key(p)
            entry = entries.get(key)
            if entry is None:
                where = path / (INDEX_FILE if (path / INDEX_FILE).is_file() else SINGLE_FILE)
                raise CheckpointError(f"{where}: missing tensor {key!r} (needed for {'.'.join(map(str, p))})")
            sds = var.get_value()  # a ShapeDtypeStruct in the abstract model
            want = tuple(sds.shape[::-1] if transpose else sds.shape)
            if entry.shape != want:
                raise CheckpointError(f"{entry.file}: tensor {key!r} has shape {list(entry.shape)}, "
                                      f"expected {list(want)} from config.json")
            f = files.get(entry.file) or files.setdefault(entry.file, open(entry.file, "rb"))
            arr = jax.make_array_from_callback(
                sds.shape, sharding_of(p),
                lambda idx, f=f, e=entry, t=transpose, d=sds.dtype: read_slice(f, e, idx, t, d))
            used.add(key)
            flat.append((p, var.replace(arr)))
    finally:
        for f in files.values():
            f.close()
    extra = sorted(k for k in entries if k not in used and "rotary_emb.inv_freq" not in k
                   and not (k == "lm_head.weight" and (arch == "prm" or cfg.tie_word_embeddings)))
    if extra:
        log.warning("%s: %d checkpoint tensors not used by %s, e.g. %s", path, len(extra), model_cls.__name__,
                    extra[:3])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _fresh_head(state: nnx.State, seed: int, sharding_of) -> dict[tuple, Any]:
    """A newly initialised score head as ScoreHead initialises it (kernels N(0, 0.02), biases 0), drawn with
    numpy from `seed` so it is the same on every mesh, and placed shard by shard without compiling anything."""
    rng = np.random.default_rng(seed)
    out = {}
    for p, var in nnx.to_flat_state(state):
        if p[0] != "score":
            continue
        sds = var.get_value()
        full = (rng.standard_normal(sds.shape, np.float32) * 0.02 if p[-1] == "kernel"
                else np.zeros(sds.shape, np.float32)).astype(sds.dtype)
        out[p] = var.replace(jax.make_array_from_callback(sds.shape, sharding_of(p), lambda idx, a=full: a[idx]))
    return out


def load_causal_lm(path: str | os.PathLike, mesh=None, dtype=None, *, param_dtype=None) -> Qwen2ForCausalLM:
    """A transformers Qwen2ForCausalLM directory -> our policy, created directly in `mesh`'s sharding
    (a Mesh, a spec such as "data=2,fsdp=-1,tensor=2", or None for one device).
    `param_dtype` defaults to the checkpoint's dtype, `dtype` (compute) to `param_dtype`."""
    return load(path, "lm", mesh, dtype, param_dtype=param_dtype)


def load_prm(path: str | os.PathLike, mesh=None, dtype=None, *, param_dtype=None, seed: int = 0) -> Qwen2PRM:
    """A PRM directory (ours or the official Qwen2.5-Math-PRM) or a causal-LM directory (backbone loaded,
    LM head dropped, score head freshly initialised from `seed`) -> Qwen2PRM."""
    return load(path, "prm", mesh, dtype, param_dtype=param_dtype, seed=seed)


# -- export -----------------------------------------------------------------------------------

def _to_host(x: jax.Array) -> np.ndarray:
    """Gather one (possibly sharded, possibly multi-host) array to host memory."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def hf_config(model: nnx.Module, step_token: tuple[str | None, int] | None = None) -> dict[str, Any]:
    """config.json of `model`; a PRM's names its modeling file (auto_map) and, when known, its step token
    (`step_token`, `step_token_id`: what load_prm checks the tokenizer against)."""
    arch = arch_of(model)
    cfg = {**model.cfg.to_hf(), "architectures": [HF_ARCHITECTURES[arch]]}
    if arch == "prm":
        cfg.update(num_labels=int(model.score.dense_out.kernel.shape[1]), auto_map=dict(PRM_AUTO_MAP))
        if step_token is not None:
            name, token_id = step_token
            cfg.update(**({"step_token": name} if name else {}), step_token_id=int(token_id))
    return cfg


def _export_step_token(out: Path, source: Path, step_token_id: int | None, vocab_size: int) -> tuple[str, int] | None:
    """Settle the step token of a PRM export whose tokenizer files are already copied to `out`: a stock
    Qwen2.5 tokenizer gets 151651 renamed to `<extra_0>` (the released PRM's layout) unless another id was
    asked for; without `step_token_id` the tokenizer's `<extra_0>` is the step token."""
    if step_token_id in (None, qv.OFFICIAL_STEP_TOKEN_ID) and qv.adopt_official_step_token_files(out):
        log.info("%s: Qwen2.5 tokenizer: id %d renamed to %s in the export", out, qv.OFFICIAL_STEP_TOKEN_ID,
                 qv.STEP_TOKEN)
    _ensure_added_tokens_decoder(out)
    tokenizer = load_tokenizer(out)
    if step_token_id is None:
        step_token_id = tokenizer.get_vocab().get(qv.STEP_TOKEN)
        if step_token_id is None:
            log.warning("%s: tokenizer has no %s; config.json gets no step_token_id", source, qv.STEP_TOKEN)
            return None
    name = tokenizer.convert_ids_to_tokens(int(step_token_id)) if 0 <= step_token_id < len(tokenizer) else None
    if name is None or step_token_id >= vocab_size:
        raise CheckpointError(f"{source}: step token id {step_token_id} is outside the tokenizer's vocabulary of "
                              f"{len(tokenizer)} or the model's of {vocab_size}")
    return name, int(step_token_id)


def _ensure_added_tokens_decoder(out: Path) -> None:
    """transformers 5 no longer writes `added_tokens_decoder` into tokenizer_config.json; older readers (and
    the released PRM's files) carry it, so an export states its added tokens (the step token among them)
    in both tokenizer.json and tokenizer_config.json."""
    tok_file, cfg_file = out / "tokenizer.json", out / "tokenizer_config.json"
    if not (tok_file.is_file() and cfg_file.is_file()):
        return
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    if cfg.get("added_tokens_decoder"):
        return
    fields = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    added = json.loads(tok_file.read_text(encoding="utf-8")).get("added_tokens", [])
    cfg["added_tokens_decoder"] = {str(e["id"]): {k: e[k] for k in fields if k in e} for e in added}
    cfg_file.write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def save_hf(model: nnx.Module, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, *, step_token_id: int | None = None) -> Path:
    """Write `model` as a Hugging Face directory: a policy in transformers' Qwen2ForCausalLM layout, a PRM in
    the Qwen2.5-Math-PRM layout plus our modeling file and `auto_map` (so transformers loads it as the PRM with
    trust_remote_code=True) and its step token id in config.json (`step_token_id`: given, else the tokenizer's
    `<extra_0>`; a stock Qwen2.5 tokenizer gets 151651 renamed to `<extra_0>` in the copy). Shards above
    `max_shard_bytes` (with an index); tokenizer files of `tokenizer_dir` copied alongside. Gathers one tensor
    at a time; on multi-host runs every process must call this, process 0 writes."""
    arch = arch_of(model)  # a TypeError for anything but a model of ARCHITECTURES
    out = Path(out_dir)
    writer = jax.process_index() == 0
    tok_files = [f for f in TOKENIZER_FILES if (Path(tokenizer_dir) / f).is_file()] if tokenizer_dir else []
    if tokenizer_dir is not None and not tok_files:
        raise CheckpointError(f"{tokenizer_dir}: no tokenizer files to copy ({', '.join(TOKENIZER_FILES[:2])} ...)")
    plan = []
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key, transpose = hf_key(p)
        arr = var.get_value()
        shape = tuple(arr.shape[::-1] if transpose else arr.shape)
        fetch = (lambda a=arr: _to_host(a).T) if transpose else (lambda a=arr: _to_host(a))
        plan.append((key, shape, np.dtype(arr.dtype), fetch))
    plan.sort(key=lambda t: _natural_key(t[0]))

    shards: list[list] = [[]]
    size = 0
    for item in plan:
        n = math.prod(item[1]) * item[2].itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    if writer:
        out.mkdir(parents=True, exist_ok=True)
        for stale in [out / SINGLE_FILE, out / INDEX_FILE, *out.glob("model-*-of-*.safetensors")]:
            stale.unlink(missing_ok=True)
    show = writer and sum(math.prod(s) * d.itemsize for _, s, d, _ in plan) > _PROGRESS_BYTES
    with tqdm(total=len(plan), desc=f"saving {out.name}", unit="tensor", disable=not show) as bar:
        def ticking(fetch):
            def run():
                arr = fetch()
                bar.update(1)
                return arr
            return run

        for name, items in zip(names, shards):
            items = [(k, s, d, ticking(fetch)) for k, s, d, fetch in items]
            if writer:
                write_safetensors(out / name, items)
            else:  # still take part in the gathers
                for *_, fetch in items:
                    fetch()
    if not writer:
        return out
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(math.prod(s) * d.itemsize for _, s, d, _ in plan)},
                 "weight_map": {item[0]: name for name, items in zip(names, shards) for item in items}}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    for f in tok_files:
        shutil.copyfile(Path(tokenizer_dir) / f, out / f)
    step = None
    if arch == "prm":
        if tok_files:
            step = _export_step_token(out, Path(tokenizer_dir), step_token_id, model.cfg.vocab_size)
        elif step_token_id is not None:
            step = (None, step_token_id)
        shutil.copyfile(Path(__file__).with_name(MODELING_FILE), out / MODELING_FILE)
    else:
        (out / MODELING_FILE).unlink(missing_ok=True)  # a PRM exported here before
    (out / "config.json").write_text(json.dumps(hf_config(model, step), indent=2) + "\n")
    return out


def _natural_key(key: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in key.split(".")]
