"""The training run: PRM (hard or soft step labels) or policy (causal LM).

`train()` reads as setup -> loop -> finish: `_setup` builds the model, data, optimizer state and
the jitted steps (`training.step`) into a `_Run` (fixed for the run) and a `_Live` (what each step
changes); `_train_one_step` is the loop body; `_finish` exports and writes the summary. A
non-finite loss or gradient leaves params and optimizer state untouched, and the loop stops with a
clear error, never saving it. SIGTERM is `Preemption`'s: the run saves at the next step boundary
and says so once the save is on disk.

Every `log_every` steps a row is appended to OUT/metrics.jsonl (see `training.metrics.log_row`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from prm_jax.data import pipeline as pl
from prm_jax.data.prm_format import resolve_step_token
from prm_jax.errors import InputError, RunError
from prm_jax.models import hf
from prm_jax.models.architectures import ARCHITECTURES, arch_for
from prm_jax.models.config import Qwen2Config
from prm_jax.parallel import mesh as pmesh
from prm_jax.training import checkpoint as ck
from prm_jax.training import metrics as tm
from prm_jax.training import step as ts
from prm_jax.training.config import TrainConfig
from prm_jax.training.losses import LOSSES, balanced_class_weights

log = logging.getLogger(__name__)


class TrainingDiverged(RunError):
    """The loss or the gradient norm became NaN/inf."""


# -- model ------------------------------------------------------------------------------------

def fresh_config(preset: str, overrides: dict[str, Any], vocab_needed: int) -> Qwen2Config:
    """A from-scratch Qwen2Config; the vocabulary grows to fit the tokenizer unless set explicitly."""
    base = Qwen2Config.preset(preset, **overrides)
    if "vocab_size" not in overrides and base.vocab_size < vocab_needed:
        base = base.replace(vocab_size=-(-vocab_needed // 64) * 64)
    return base


def match_dtype(params: dict, shardings: dict, dtype: str) -> dict:
    """Cast to the master-weight dtype (one jitted cast, kept sharded) unless already there."""
    if all(a.dtype == jnp.dtype(dtype) for a in jax.tree.leaves(params)):
        return params
    return jax.jit(lambda p: jax.tree.map(lambda a: a.astype(dtype), p), out_shardings=shardings)(params)


def init_from_hf(init_dir: str, arch: str, mesh, seed: int, param_dtype: str) -> tuple[dict, Qwen2Config]:
    """Pure-dict params + config from a Hugging Face directory. A PRM run from a causal-LM
    checkpoint (the paper: Qwen2.5-Math-Instruct) keeps the backbone and gets a fresh score head
    (seeded), the LM head dropped (`hf.load_prm` does this)."""
    model = hf.load(init_dir, arch, mesh=mesh, param_dtype=param_dtype, seed=seed)
    return nnx.to_pure_dict(nnx.state(model)), model.cfg


def init_fresh(cfg: Qwen2Config, arch: str, mesh, seed: int) -> dict:
    model = pmesh.create_sharded(lambda: ARCHITECTURES[arch](cfg, nnx.Rngs(seed)), mesh)
    return nnx.to_pure_dict(nnx.state(model))


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer  # lazy: start-up (transformers takes seconds to import)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def evaluate(eval_step, params, encoded: pl.EncodedSet, rows: int, pad_id: int, max_length: int,
             buckets, mesh, arch: str) -> dict[str, float]:
    lsum, n, c = 0.0, 0, 0
    for batch in pl.eval_batches(encoded.examples, batch_rows=rows, pad_id=pad_id, max_length=max_length,
                                 buckets=buckets):
        if arch == "prm":
            batch = pl.with_score_positions(batch)
        l_, n_, c_ = jax.device_get(eval_step(params, pl.place_batch(batch, mesh)))
        lsum, n, c = lsum + float(l_), n + int(n_), c + int(c_)
    return {"eval_loss": lsum / max(n, 1), "eval_step_accuracy": c / max(n, 1), "eval_labels": n}


# -- preemption ---------------------------------------------------------------------------------

class Preemption:
    """SIGTERM -> stop at a step boundary. Single host: our own handler only flags it (installed on
    the main thread while the run loops, the previous one restored after). Multi-host: hosts receive
    SIGTERM at different moments, so they agree on the step to stop at through JAX's preemption
    sync (orbax `reached_preemption`). `requested(step)` is read once per step (see there)."""

    def __init__(self, manager):
        self._manager = manager  # the orbax CheckpointManager
        self._multi_host = jax.process_count() > 1
        self._signal: int | None = None
        self._prev = None

    def __enter__(self) -> Preemption:
        if not self._multi_host and threading_is_main():
            self._prev = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)
            self._prev = None

    def _on_sigterm(self, signum, frame) -> None:  # only flag it; the loop saves at the next step boundary
        self._signal = signum

    def requested(self, step: int) -> bool:
        """Whether to stop (and save) at this step. Call it once per step and keep the answer: a signal
        landing later in the step (during a periodic save, a log row, an eval) is acted on at the next
        step, never half-seen (logged as saved, not saved)."""
        if self._multi_host and self._manager.reached_preemption(step):
            self._signal = signal.SIGTERM
        return self._signal is not None


# -- setup --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Run:
    """What setup decided, fixed for the whole run."""
    cfg: TrainConfig
    objective: str
    arch: str
    out_dir: str
    primary: bool  # the one process that writes metrics, summary and tokenizer
    mesh: Any
    eval_rows: int
    ckpt: ck.Checkpointer
    latest: int | None  # the step resumed from
    start: int
    source: str
    tokenizer: Any
    tok_dir: str
    metrics_path: str
    model_cfg: Qwen2Config
    step_token_id: int | None
    train_set: pl.EncodedSet
    eval_set: pl.EncodedSet | None
    class_weights: tuple[float, float] | None
    data_iter: Any
    graphdef: Any
    train_step: Callable
    eval_step: Callable
    meta: dict[str, Any]  # saved with every checkpoint
    peak: float | None
    n_params: int


@dataclasses.dataclass
class _Live:
    """What each step changes (params and optimizer state are donated to the step and replaced)."""
    params: dict
    opt_state: Any
    step: int
    window: tm.Window = dataclasses.field(default_factory=tm.Window)
    pending: tuple | None = None  # (step, ok) of the last dispatched step, checked one step late (keeps the device busy)
    last_row: dict[str, Any] = dataclasses.field(default_factory=dict)
    last_eval: dict[str, Any] = dataclasses.field(default_factory=dict)
    total_real: int = 0
    total_padded: int = 0
    status: str = "completed"


def _micro_batch(cfg: TrainConfig, mesh) -> int:
    ways, accum, rows = pmesh.batch_ways(mesh), cfg.optim.accum_steps, cfg.data.batch_size
    if rows % accum or (rows // accum) % ways:
        raise InputError(f"data.batch_size={rows} must split into optim.accum_steps={accum} micro-batches "
                         f"whose size divides over data*fsdp={ways} devices")
    return rows // accum


def _model_and_tokenizer(cfg: TrainConfig, objective: str, arch: str, out_dir: str, init_dir: str | None, mesh,
                         latest: int | None, meta: dict | None, tok_dir: str):
    """(tokenizer, model config with the run's runtime knobs, params or None, source)."""
    source = None
    if latest is not None:
        if meta.get("objective") != objective:
            raise InputError(f"{out_dir} holds a run with objective {meta.get('objective')!r}, not {objective!r}; "
                             "use a new --out directory")
        model_cfg = Qwen2Config(**meta["model_config"])
        tokenizer = _load_tokenizer(tok_dir)
        params = None
    else:
        tokenizer = _load_tokenizer(cfg.model.tokenizer or init_dir) if (cfg.model.tokenizer or init_dir) else None
        if tokenizer is None:
            raise InputError("no tokenizer: give --init DIR or set model.tokenizer (--tokenizer)")
        if init_dir:
            params, model_cfg = init_from_hf(init_dir, arch, mesh, cfg.run.seed, cfg.model.param_dtype)
            source = init_dir
        elif cfg.model.preset:
            model_cfg = fresh_config(cfg.model.preset, cfg.model.overrides, len(tokenizer))
            params = None
            source = f"fresh {cfg.model.preset} model"
        else:
            raise InputError("no model: give --init DIR or --init-config PRESET|YAML (model.preset)")
    model_cfg = model_cfg.replace(**cfg.model.runtime())
    return tokenizer, model_cfg, params, source


def _step_token_id(tokenizer, arch: str, step_token: str, model_cfg: Qwen2Config) -> int | None:
    if arch != "prm":
        return None
    step_token_id = resolve_step_token(tokenizer, step_token)
    if step_token_id >= model_cfg.vocab_size:
        raise InputError(f"step token {step_token!r} has id {step_token_id}, outside the model's vocabulary "
                         f"of {model_cfg.vocab_size}")
    return step_token_id


def _data(cfg: TrainConfig, objective: str, arch: str, tokenizer, step_token_id: int | None, train_file: str,
          eval_file: str | None, progress: bool):
    """(train set, eval set or None, class weights or None, the training batches' iterator)."""
    dcfg = cfg.data
    opts = pl.EncodeOptions(objective=objective, max_length=dcfg.max_length, step_token_id=step_token_id,
                            step_token_text=dcfg.step_token if arch == "prm" and not str(dcfg.step_token).isdigit()
                            else None,
                            system_prompt=dcfg.system_prompt, eos_token_id=tokenizer.eos_token_id)
    train_set = pl.encode_records(tokenizer, train_file, opts, progress=progress)
    eval_set = pl.encode_records(tokenizer, eval_file, opts, progress=progress) if eval_file else None
    log.info("train data: %s", train_set.stats.summary())
    class_weights = None
    if cfg.optim.class_balance and arch == "prm":
        class_weights = balanced_class_weights(train_set.examples)
        log.info("class weights (wrong, right): %.3f, %.3f", *class_weights)
    dataset = pl.train_dataset(train_set.examples, batch_rows=dcfg.batch_size, seed=cfg.run.seed,
                               pad_id=tokenizer.pad_token_id, max_length=dcfg.max_length, pack=dcfg.pack,
                               buckets=dcfg.buckets, group_by_length=dcfg.group_by_length)
    return train_set, eval_set, class_weights, iter(dataset)


def _restore(ckpt: ck.Checkpointer, latest: int, abs_params, param_sh, abs_opt, opt_sh, data_iter):
    """(step restored, params, opt_state): the newest step at or below `latest` that restores; newer
    ones are set aside, out of the way of this run's own saves of those steps."""
    abs_p, abs_o = ck.abstract_like(abs_params, param_sh), ck.abstract_like(abs_opt, opt_sh)
    latest, (params, opt_state, data_state, _) = ck.restore_newest(
        ckpt, lambda s: ckpt.restore(s, abs_p, abs_o), [s for s in ckpt.all_steps() if s <= latest])
    for path in ckpt.set_aside([s for s in ckpt.all_steps() if s > latest]):
        log.warning("moved the checkpoint that does not restore to %s", path)
    data_iter.set_state(data_state)
    return latest, params, opt_state


def _setup(cfg: TrainConfig, train_file: str, out_dir: str, init_dir: str | None, eval_file: str | None,
           objective: str, devices: Sequence[Any] | None, progress: bool) -> tuple[_Run, _Live]:
    if objective not in LOSSES:
        raise InputError(f"objective {objective!r}: expected one of {', '.join(LOSSES)}")
    run, arch = cfg.run, arch_for(objective)
    if not _has_steps(os.path.join(out_dir, "checkpoints")):  # a fresh run reads them; a resumed one does not
        check_model_dirs(init_dir, cfg.model.tokenizer)
    primary = jax.process_index() == 0
    mesh = pmesh.make_mesh(run.mesh, devices=pmesh.mesh_devices(run.mesh, devices))
    micro = _micro_batch(cfg, mesh)
    os.makedirs(out_dir, exist_ok=True)  # only after the checks above, so a bad command leaves no half-made OUT
    ckpt = ck.Checkpointer(os.path.join(out_dir, "checkpoints"), keep=run.keep)
    # Resume from the newest step whose meta reads (a corrupt newer one is skipped, and said so); the
    # arrays are restored further down, falling back further if they do not restore either.
    latest, meta = ck.restore_newest(ckpt, ckpt.read_meta) if ckpt.all_steps() else (None, None)
    tok_dir, metrics_path = os.path.join(out_dir, "tokenizer"), os.path.join(out_dir, "metrics.jsonl")

    tokenizer, model_cfg, params, source = _model_and_tokenizer(cfg, objective, arch, out_dir, init_dir, mesh,
                                                                latest, meta, tok_dir)
    step_token_id = _step_token_id(tokenizer, arch, cfg.data.step_token, model_cfg)
    if latest is None:
        if primary:
            tokenizer.save_pretrained(tok_dir)
        if params is None:
            params = init_fresh(model_cfg, arch, mesh, run.seed)
    if tokenizer.pad_token_id is None:
        raise InputError("the tokenizer has no pad token")
    train_set, eval_set, class_weights, data_iter = _data(cfg, objective, arch, tokenizer, step_token_id,
                                                          train_file, eval_file, progress)

    tx, schedule = ts.make_optimizer(cfg), ts.make_schedule(cfg)
    graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: ARCHITECTURES[arch](model_cfg, nnx.Rngs(0))))
    param_sh = nnx.to_pure_dict(pmesh.state_shardings(abs_state, mesh))
    abs_params = nnx.to_pure_dict(abs_state)
    opt_sh, abs_opt = ts.opt_state_shardings(tx, abs_params, param_sh, mesh)
    if latest is not None:
        latest, params, opt_state = _restore(ckpt, latest, abs_params, param_sh, abs_opt, opt_sh, data_iter)
        source = f"resumed from step {latest}"
        if primary:
            tm.rewrite_metrics(metrics_path, latest)
    else:
        params = match_dtype(params, param_sh, model_cfg.param_dtype)
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
        if primary and os.path.exists(metrics_path):
            os.remove(metrics_path)
    train_step, eval_step = ts.cached_steps(cfg, graphdef, objective, tx, mesh, param_sh, opt_sh, schedule,
                                            class_weights)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abs_params))
    log.info("model: %s (%s), %.2fM params, mesh %s, %s", arch, source, n_params / 1e6, dict(mesh.shape),
             train_set.stats.summary())
    start = latest if latest is not None else 0
    r = _Run(cfg=cfg, objective=objective, arch=arch, out_dir=out_dir, primary=primary, mesh=mesh,
             eval_rows=run.eval_batch_size or micro, ckpt=ckpt, latest=latest, start=start, source=source,
             tokenizer=tokenizer, tok_dir=tok_dir, metrics_path=metrics_path, model_cfg=model_cfg,
             step_token_id=step_token_id, train_set=train_set, eval_set=eval_set, class_weights=class_weights,
             data_iter=data_iter, graphdef=graphdef, train_step=train_step, eval_step=eval_step,
             meta={**ck.model_meta(model_cfg, arch), "objective": objective, "config": cfg.to_dict(),
                   "tokenizer_dir": os.path.abspath(tok_dir), "step_token_id": step_token_id},
             peak=tm.peak_flops_per_device(jax.devices()[0].device_kind, run.peak_flops), n_params=n_params)
    return r, _Live(params=params, opt_state=opt_state, step=start)


# -- loop ---------------------------------------------------------------------------------------

def _check(r: _Run, pending: tuple) -> None:
    step, ok = pending
    if not bool(ok):
        good = r.ckpt.latest_step()
        raise TrainingDiverged(
            f"non-finite loss, gradient or update at step {step}: parameters were not updated and no checkpoint "
            f"was written after it; last good checkpoint: "
            f"{os.path.join(r.ckpt.directory, str(good)) if good is not None else 'none'}. "
            "Lower optim.lr, enable clipping, or check the data.")


def _eval_row(r: _Run, live: _Live) -> dict[str, Any]:
    dcfg = r.cfg.data
    row = {"step": live.step, "split": "eval",
           **evaluate(r.eval_step, live.params, r.eval_set, r.eval_rows, r.tokenizer.pad_token_id, dcfg.max_length,
                      dcfg.buckets, r.mesh, r.arch)}
    if r.primary:
        tm.append_row(r.metrics_path, row)
    return row


def _train_one_step(r: _Run, live: _Live, preemption: Preemption, callbacks: Sequence[Callable[[int], None]],
                    bar) -> bool:
    """One step with its log row, save and eval; True when a SIGTERM stopped the run here (saved)."""
    run = r.cfg.run
    host_batch = next(r.data_iter)
    data_state = r.data_iter.get_state()
    if r.arch == "prm":  # logits only at the labelled step tokens
        host_batch = pl.with_score_positions(host_batch)
    real = int((host_batch["segment_ids"] > 0).sum())
    padded = int(host_batch["segment_ids"].size)
    batch = pl.place_batch(host_batch, r.mesh, r.cfg.optim.accum_steps)
    live.params, live.opt_state, metrics = r.train_step(live.params, live.opt_state, batch)
    live.step += 1
    step = live.step
    if live.pending is not None:
        _check(r, live.pending)
    live.pending = (step, metrics["ok"])
    live.window.steps.append(metrics)
    if step == r.start + 1:
        # The first step of a process includes compilation: leave it out of tokens/s and MFU.
        jax.block_until_ready(metrics["loss"])
        live.window.t0 = time.perf_counter()
    else:
        live.window.real += real
        live.window.padded += padded
        live.window.flops += real * tm.train_flops_per_token(r.model_cfg, r.arch, host_batch["input_ids"].shape[1])
    live.total_real += real
    live.total_padded += padded
    for cb in callbacks:
        cb(step)
    stopping = preemption.requested(step)  # read once per step (see Preemption.requested)
    must_log = step % run.log_every == 0 or step == run.steps or stopping
    must_save = (run.save_every and step % run.save_every == 0) or step == run.steps or stopping
    if must_log or must_save:
        _check(r, live.pending)
        live.pending = None
    if must_log:
        live.last_row = tm.log_row(step, live.window, r.mesh.devices.size, r.peak)
        if r.primary:
            tm.append_row(r.metrics_path, live.last_row)
        live.window = tm.Window()
        if bar is not None:
            bar.set_postfix(loss=f"{live.last_row['loss']:.4f}", acc=f"{live.last_row['step_accuracy']:.3f}")
    if stopping:  # on disk before we say so and exit
        r.ckpt.save_now(step, live.params, live.opt_state, data_state, r.meta)
    elif must_save:
        r.ckpt.save(step, live.params, live.opt_state, data_state, r.meta)
    if r.eval_set is not None and run.eval_every and step % run.eval_every == 0 and step != run.steps:
        live.last_eval = _eval_row(r, live)
    if bar is not None:
        bar.update(1)
    if stopping:
        live.status = "preempted"
        log.warning("SIGTERM: saved step %d to %s; rerun the same command to resume", step, r.ckpt.directory)
    return stopping


def _loop(r: _Run, live: _Live, preemption: Preemption, callbacks: Sequence[Callable[[int], None]], bar) -> None:
    while live.step < r.cfg.run.steps:
        if _train_one_step(r, live, preemption, callbacks, bar):
            break
    if live.pending is not None:
        _check(r, live.pending)
    if live.status == "completed" and r.eval_set is not None:
        live.last_eval = _eval_row(r, live)


# -- finish -------------------------------------------------------------------------------------

def _finish(r: _Run, live: _Live, t_start: float) -> dict[str, Any]:
    """HF export (a completed run that asks for it), then the summary (also OUT/summary.json)."""
    run = r.cfg.run
    hf_dir = None
    if live.status == "completed" and run.export_hf:  # every process takes part in the gathers; process 0 writes
        hf_dir = os.path.join(r.out_dir, "hf")
        hf.save_hf(nnx.merge(r.graphdef, live.params), hf_dir, tokenizer_dir=r.tok_dir, step_token_id=r.step_token_id)
    r.ckpt.close()
    elapsed = time.perf_counter() - t_start
    summary = {
        "status": live.status, "objective": r.objective, "step": live.step, "steps": run.steps,
        "resumed_from": r.latest, "source": r.source, "params": r.n_params, "mesh": dict(r.mesh.shape),
        "class_weights": r.class_weights, "loss": live.last_row.get("loss"),
        "step_accuracy": live.last_row.get("step_accuracy"), **live.last_eval,
        "tokens": live.total_real, "padded_tokens": live.total_padded, "time_s": elapsed,
        "tokens_per_s": live.total_real / elapsed if elapsed else None,
        "data": dataclasses.asdict(r.train_set.stats), "checkpoints": r.ckpt.directory, "hf": hf_dir,
        "metrics": r.metrics_path,
    }
    summary.pop("split", None)
    if r.primary:
        with open(os.path.join(r.out_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return summary


def train(config: TrainConfig, train_file: str, out_dir: str, *, init_dir: str | None = None,
          eval_file: str | None = None, objective: str = "prm", devices: Sequence[Any] | None = None,
          callbacks: Sequence[Callable[[int], None]] = (), progress: bool = True) -> dict[str, Any]:
    """Train (or resume, when OUT already holds checkpoints) and return the summary dict.

    The model comes from `init_dir` (a Hugging Face directory; a causal LM gets a fresh score head
    for PRM objectives), or is built fresh from `config.model.preset` (+ overrides) with the
    tokenizer in `config.model.tokenizer`. `callbacks` are called with the step number after each
    step (tests use them to deliver SIGTERM at a chosen step)."""
    r, live = _setup(config, train_file, out_dir, init_dir, eval_file, objective, devices, progress)
    t_start = time.perf_counter()
    with Preemption(r.ckpt.manager) as preemption:
        bar = tqdm(total=config.run.steps, initial=r.start, desc=f"train {objective}", unit="step") if progress else None
        try:
            _loop(r, live, preemption, callbacks, bar)
        finally:
            if bar is not None:
                bar.close()
            r.ckpt.wait()
    return _finish(r, live, t_start)


def _has_steps(checkpoints_dir: str) -> bool:
    return os.path.isdir(checkpoints_dir) and any(n.isdigit() for n in os.listdir(checkpoints_dir))


def check_model_dirs(init_dir: str | None, tokenizer_dir: str | None) -> None:
    """A fresh run's --init and tokenizer must be local directories (the Hugging Face hub's own error
    for a missing path is about repo ids); checked before OUT is created."""
    if init_dir is not None and not os.path.isfile(os.path.join(init_dir, "config.json")):
        why = "no config.json in it" if os.path.isdir(init_dir) else "no such directory"
        raise FileNotFoundError(f"--init {init_dir}: {why}; expected a local Hugging Face model directory")
    if tokenizer_dir is not None and not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"tokenizer {tokenizer_dir}: no such directory; expected a local tokenizer directory "
                                "(--tokenizer, model.tokenizer)")


def threading_is_main() -> bool:
    return threading.current_thread() is threading.main_thread()


def format_summary(s: dict[str, Any]) -> str:
    def num(x, fmt):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)
    lines = [
        f"{s['status']}: {s['objective']} step {s['step']}/{s['steps']}"
        + (f" (resumed from {s['resumed_from']})" if s["resumed_from"] is not None else ""),
        f"  loss {num(s['loss'], '.4f')}  step accuracy {num(s['step_accuracy'], '.4f')}",
    ]
    if "eval_loss" in s:
        lines.append(f"  eval loss {num(s['eval_loss'], '.4f')}  eval step accuracy "
                     f"{num(s['eval_step_accuracy'], '.4f')} over {s['eval_labels']} labels")
    d = s["data"]
    lines += [
        f"  data: {d['kept']}/{d['records']} records, {d['truncated_records']} truncated "
        f"({d['dropped_step_labels']} step labels dropped), {d['dropped_records']} dropped",
        f"  {s['tokens']} real tokens ({s['padded_tokens']} padded slots) in {s['time_s']:.1f}s = "
        f"{num(s['tokens_per_s'], '.0f')} tokens/s",
        f"  checkpoints: {s['checkpoints']}" + (f"\n  hf export: {s['hf']}" if s["hf"] else ""),
        f"  metrics: {s['metrics']}",
    ]
    return "\n".join(lines)
