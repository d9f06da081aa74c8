"""Orbax checkpoints of a training run: parameters, optimizer state, data-iterator state, metadata.

Layout: OUT/checkpoints/<step>/{params, opt_state, data, meta}. Orbax writes each step into a
temporary directory and renames it when complete, so a crash mid-save never leaves a step that
looks finished; the manager keeps the newest `keep` steps. Saving is asynchronous: `save` returns
once the arrays are copied off the devices and the files are written in the background.

`meta` (JSON) holds what is needed to rebuild the model without the original init directory:
the architecture ("prm" | "lm"), the Qwen2Config fields, the objective and the training config.
The tokenizer lives next to the checkpoints in OUT/tokenizer.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from prm_jax.models.qwen2 import Qwen2Config


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

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any | None = None) -> Any:
    """ShapeDtypeStructs (with shardings when given) for a tree of arrays or ShapeDtypeStructs."""
    if shardings is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), tree)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def model_meta(model_cfg: Qwen2Config, arch: str) -> dict[str, Any]:
    return {"arch": arch, "model_config": dataclasses.asdict(model_cfg)}


def build_abstract(meta: dict[str, Any]) -> tuple[nnx.GraphDef, Any, Qwen2Config]:
    """(graphdef, abstract pure-dict params, config) of the model a checkpoint holds."""
    from prm_jax.models.prm import Qwen2PRM
    from prm_jax.models.qwen2 import Qwen2ForCausalLM

    cfg = Qwen2Config(**meta["model_config"])
    cls = {"prm": Qwen2PRM, "lm": Qwen2ForCausalLM}[meta["arch"]]
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
    meta = ckpt.read_meta(step)
    graphdef, abstract, _ = build_abstract(meta)
    params, _, _, meta = ckpt.restore(step, abstract_like(abstract))
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
    hf.save_hf(model, out_dir, tokenizer_dir=tokenizer_dir_for(root, meta))
    return out_dir


def to_numpy(tree: Any) -> Any:
    return jax.tree.map(lambda a: np.asarray(jax.device_get(a)), tree)
