"""Orbax checkpoints of a training run: parameters, optimizer state, data-iterator state, metadata.

Layout: OUT/checkpoints/<step>/{params, opt_state, data, meta}. Orbax writes each step into a
temporary directory and renames it when complete, so a crash mid-save never leaves a step that
looks finished; the manager keeps the newest `keep` steps. Saving is asynchronous: `save` returns
once the arrays are copied off the devices and the files are written in the background.
A preemption save (`save_now`) waits for that background work, before and after, so the step is on
disk when the run says so. Resuming takes the newest step that restores (`restore_newest`): a step
that does not (a torn file, a missing item) is logged, skipped and renamed `<step>.unrestorable`.

`meta` (JSON) holds what is needed to rebuild the model without the original init directory:
the architecture (a key of `models.architectures.ARCHITECTURES`), the Qwen2Config fields, the objective
and the training config.
The tokenizer lives next to the checkpoints in OUT/tokenizer.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from prm_jax.errors import RunError
from prm_jax.models.architectures import ARCHITECTURES
from prm_jax.models.config import Qwen2Config
from prm_jax.models.hf import CheckpointError  # also this module's error: a step that does not restore

log = logging.getLogger(__name__)
T = TypeVar("T")


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, params: Any, opt_state: Any, data_state: dict[str, Any], meta: dict[str, Any]) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave({**meta, "step": step})), force=True)

    def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any | None = None
                ) -> tuple[Any, Any | None, dict[str, Any], dict[str, Any]]:
        """Restore into the given abstract trees (jax.ShapeDtypeStruct with shardings), so every
        array lands directly on its devices. Without abstract_opt_state only params/data/meta."""
        items = dict(params=ocp.args.StandardRestore(abstract_params), data=ocp.args.JsonRestore(),
                     meta=ocp.args.JsonRestore())
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        r = self.manager.restore(step, args=ocp.args.Composite(**items))
        return r["params"], (r["opt_state"] if abstract_opt_state is not None else None), r["data"], r["meta"]

    def read_meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def set_aside(self, steps: list[int]) -> list[str]:
        """Rename steps that do not restore to `<step>.unrestorable[.N]` (orbax ignores such names),
        so a resumed run can save those steps again, and nothing is deleted. Every process calls it;
        process 0 renames. Returns the new paths."""
        moved = []
        for step in steps:
            dst = base = self.step_dir(step) + ".unrestorable"
            n = 1
            while os.path.exists(dst):
                dst, n = f"{base}.{n}", n + 1
            if jax.process_index() == 0:
                os.rename(self.step_dir(step), dst)
            moved.append(dst)
        if steps:
            multihost_utils.sync_global_devices("prm_jax checkpoint set_aside")
            self.manager.reload()
        return moved

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save_now(self, step: int, params: Any, opt_state: Any, data_state: dict[str, Any],
                 meta: dict[str, Any]) -> None:
        """Save `step` and return only once it is on disk (a preemption save: the process exits next).
        Waits for any in-flight async save first, then for this one; every process of a multi-host
        run calls it (orbax's save and wait are collective). Raises if the step did not land."""
        self.wait()
        if step not in self.all_steps():  # the periodic save of this very step may have written it already
            self.save(step, params, opt_state, data_state, meta)
        self.wait()
        # Orbax logs (and swallows) a failed background commit and leaves the step unfinalized:
        # only the renamed step directory proves the save completed.
        if not os.path.isdir(os.path.join(self.step_dir(step), "params")):
            raise RunError(f"{self.step_dir(step)}: the save of step {step} did not complete")

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def one_line(e: BaseException) -> str:
    """An exception as one short line (TensorStore errors span many lines and quote whole specs)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def restore_newest(ckpt: Checkpointer, restore: Callable[[int], T], steps: list[int] | None = None) -> tuple[int, T]:
    """(step, restore(step)) for the newest step that restores, newest first; each step skipped is
    logged with the reason. None restoring is a CheckpointError naming the directory."""
    steps = sorted(ckpt.all_steps() if steps is None else steps, reverse=True)
    reasons = []
    for step in steps:
        try:
            return step, restore(step)
        except Exception as e:  # any failure to read a step (TensorStore, JSON, a missing item)
            reasons.append(f"step {step}: {one_line(e)}")
            log.warning("checkpoint %s does not restore, skipping it: %s", ckpt.step_dir(step), one_line(e))
    raise CheckpointError(f"{ckpt.directory}: no checkpoint restores"
                          + (f" ({'; '.join(reasons)})" if reasons else " (no steps)"))


def abstract_like(tree: Any, shardings: Any | None = None) -> Any:
    """ShapeDtypeStructs (with shardings when given) for a tree of arrays or ShapeDtypeStructs."""
    if shardings is None:
        # this process's first device: jax.devices()[0] belongs to process 0 in a multi-process run
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), tree)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def model_meta(model_cfg: Qwen2Config, arch: str) -> dict[str, Any]:
    return {"arch": arch, "model_config": dataclasses.asdict(model_cfg)}


def build_abstract(meta: dict[str, Any]) -> tuple[nnx.GraphDef, Any, Qwen2Config]:
    """(graphdef, abstract pure-dict params, config) of the model a checkpoint holds."""
    cfg = Qwen2Config(**meta["model_config"])
    cls = ARCHITECTURES[meta["arch"]]
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(cfg, nnx.Rngs(0))))
    return graphdef, nnx.to_pure_dict(state), cfg


def locate(checkpoint: str) -> tuple[str, int | None]:
    """A run dir (OUT), its checkpoints dir, or one step's dir -> (checkpoints dir, step or None=latest)."""
    checkpoint = os.path.abspath(checkpoint)
    if os.path.isdir(os.path.join(checkpoint, "checkpoints")):
        return os.path.join(checkpoint, "checkpoints"), None
    base = os.path.basename(checkpoint.rstrip("/"))
    if base.isdigit() and os.path.isdir(os.path.join(checkpoint, "params")):
        return os.path.dirname(checkpoint), int(base)
    if os.path.isdir(checkpoint):
        return checkpoint, None
    raise FileNotFoundError(f"{checkpoint}: no such checkpoint directory")


def load_model(checkpoint: str, step: int | None = None) -> tuple[nnx.Module, dict[str, Any], int]:
    """The model saved at `step` (default: the latest) on one device, with the checkpoint's meta."""
    root, found_step = locate(checkpoint)
    ckpt = Checkpointer(root, async_save=False)
    step = step if step is not None else (found_step if found_step is not None else ckpt.latest_step())
    if step is None:
        raise FileNotFoundError(f"{root}: no checkpoint steps found")
    if step not in ckpt.all_steps():
        raise FileNotFoundError(f"{root}: no checkpoint at step {step} (have {ckpt.all_steps()})")
    try:
        meta = ckpt.read_meta(step)
        graphdef, abstract, _ = build_abstract(meta)
        params, _, _, meta = ckpt.restore(step, abstract_like(abstract))
    except Exception as e:  # a corrupt step: one line naming it, not a TensorStore traceback
        raise CheckpointError(f"{ckpt.step_dir(step)}: checkpoint does not restore: {one_line(e)}") from e
    finally:
        ckpt.close()
    return nnx.merge(graphdef, params), meta, step


def tokenizer_dir_for(root: str, meta: dict[str, Any]) -> str | None:
    """OUT/tokenizer next to OUT/checkpoints, else the path recorded at save time."""
    near = os.path.join(os.path.dirname(root.rstrip("/")), "tokenizer")
    if os.path.isdir(near):
        return near
    return meta.get("tokenizer_dir")


def export_hf(checkpoint: str, out_dir: str, step: int | None = None) -> str:
    """Write the Hugging Face layout (safetensors + config + tokenizer) of a saved step."""
    from prm_jax.models import hf

    model, meta, step = load_model(checkpoint, step)
    root, _ = locate(checkpoint)
    hf.save_hf(model, out_dir, tokenizer_dir=tokenizer_dir_for(root, meta), step_token_id=meta.get("step_token_id"))
    return out_dir


def to_numpy(tree: Any) -> Any:
    return jax.tree.map(lambda a: np.asarray(jax.device_get(a)), tree)
