"""Preemption and resume against the failure modes of real runs: SIGTERM landing while an earlier
periodic save is still in flight or while the loop is past its stop check (the reported step must be
on disk when it is reported, and resume from it must reach the uninterrupted run's parameters), and
corrupted checkpoints (resume falls back to the newest one that restores, says so, and fails in one
line naming the directory when none does)."""
import json
import logging
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from conftest import TINY_RECIPE, toy_records
from prm_jax import cli
from prm_jax.training import checkpoint as ck
from prm_jax.training import metrics as tm
from prm_jax.training import trainer
from prm_jax.training.config import apply_overrides, load_config

# Periodic saves at 3 and 6, the final one at 7; keep all three.
SETS = ["steps=7", "save_every=3", "keep=3", "log_every=1", "max_length=64", "buckets=[64]", "lr=1e-2",
        "mesh=fsdp=2", "export_hf=false", "eval_every=0"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, toy_tokenizer_dir):
    """The uninterrupted 7-step run (checkpoints 3, 6, 7) that every other run is compared with."""
    root = tmp_path_factory.mktemp("resume")
    train_file = str(root / "train.jsonl")
    with open(train_file, "w") as f:
        for r in toy_records(40, 0):
            f.write(json.dumps(r) + "\n")
    cfg = apply_overrides(load_config(TINY_RECIPE), [f"model.tokenizer={toy_tokenizer_dir}", *SETS])
    full = trainer.train(cfg, train_file, str(root / "full"), progress=False)
    assert full["status"] == "completed" and full["step"] == 7
    return {"root": root, "train": train_file, "cfg": cfg, "full": str(root / "full")}


def _stored(out_dir, step):
    c = ck.Checkpointer(os.path.join(out_dir, "checkpoints"))
    r = c.manager.restore(step)  # every item, exactly as stored
    c.close()
    return r


def _assert_same_state(a_dir, b_dir, step):
    a, b = _stored(a_dir, step), _stored(b_dir, step)
    for key in ("params", "opt_state"):
        la, lb = jax.tree.leaves(a[key]), jax.tree.leaves(b[key])
        assert len(la) == len(lb) > 0
        for x, y in zip(la, lb):
            assert np.array_equal(np.asarray(x), np.asarray(y)), key  # bitwise, as an uninterrupted run
    assert a["data"] == b["data"]


class _SigtermReports(logging.Handler):
    """Records, at the moment the trainer says "SIGTERM: saved step N", whether N is on disk."""

    def __init__(self, checkpoints):
        super().__init__()
        self.checkpoints, self.seen = checkpoints, []

    def emit(self, record):
        if record.getMessage().startswith("SIGTERM: saved step"):
            step = record.args[0]
            self.seen.append((step, os.path.isdir(os.path.join(self.checkpoints, str(step), "params"))))


# (how SIGTERM arrives, at which step, the step the run must stop and save at):
#  - "callback": before the loop reads the flag (trainer's callbacks hook), one step after the periodic
#    save of step 3, whose async write is still finishing;
#  - "late": while the loop writes step k's metrics row, after it has decided step k is no stop; the
#    run stops at k + 1 (mid-interval, and just before the periodic save of 6, on which it lands).
@pytest.mark.parametrize("how,at,stops_at", [("callback", 4, 4), ("late", 4, 5), ("late", 5, 6)])
def test_sigterm_step_is_on_disk_when_reported_and_resume_reaches_the_full_run(base, tmp_path, monkeypatch,
                                                                               how, at, stops_at):
    out = str(tmp_path / "run")
    callbacks = []
    if how == "callback":
        callbacks = [lambda step: step == at and os.kill(os.getpid(), signal.SIGTERM)]
    else:
        log_row = tm.log_row

        def late_sigterm(step, *a):
            row = log_row(step, *a)
            if step == at:
                os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled by the trainer's handler
            return row
        monkeypatch.setattr(tm, "log_row", late_sigterm)
    reports = _SigtermReports(os.path.join(out, "checkpoints"))
    logging.getLogger(trainer.__name__).addHandler(reports)
    try:
        stopped = trainer.train(base["cfg"], base["train"], out, callbacks=callbacks, progress=False)
    finally:
        logging.getLogger(trainer.__name__).removeHandler(reports)
    monkeypatch.undo()
    assert stopped["status"] == "preempted" and stopped["step"] == stops_at
    assert reports.seen == [(stops_at, True)]  # on disk before the process says so
    steps = ck.Checkpointer(os.path.join(out, "checkpoints")).all_steps()
    assert steps == sorted({3, stops_at}), steps  # the earlier periodic save, and the reported step
    _, meta, step = ck.load_model(os.path.join(out, "checkpoints", str(stops_at)))
    assert step == stops_at and meta["step"] == stops_at
    resumed = trainer.train(base["cfg"], base["train"], out, progress=False)
    assert resumed["status"] == "completed" and resumed["resumed_from"] == stops_at and resumed["step"] == 7
    _assert_same_state(base["full"], out, 7)


# -- corrupted checkpoints ------------------------------------------------------------------------

def _truncate_arrays(step_dir):
    """Cut every array data file of the step's params in half (a save torn by a full disk)."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "params"))
             if os.path.basename(d) == "d" for f in fs]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


def _drop_meta(step_dir):
    shutil.rmtree(os.path.join(step_dir, "meta"))


# A TensorStore read that fails leaves a callback for orbax's closed event loop: noise, not a failure.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corrupt,reason", [(_truncate_arrays, "OUT_OF_RANGE"), (_drop_meta, 'Item "meta"')])
def test_resume_skips_a_corrupted_latest_checkpoint_and_says_so(base, tmp_path, caplog, corrupt, reason):
    out = str(tmp_path / "run")
    shutil.copytree(base["full"], out)
    seven = os.path.join(out, "checkpoints", "7")
    corrupt(seven)
    caplog.set_level(logging.WARNING)
    resumed = trainer.train(base["cfg"], base["train"], out, progress=False)
    assert resumed["resumed_from"] == 6 and resumed["status"] == "completed" and resumed["step"] == 7
    skipped = [r.getMessage() for r in caplog.records if "does not restore, skipping it" in r.getMessage()]
    assert len(skipped) == 1 and seven in skipped[0] and reason in skipped[0], skipped
    assert "\n" not in skipped[0]
    assert os.path.isdir(seven + ".unrestorable")  # kept for inspection, out of the way of the new save of 7
    _assert_same_state(base["full"], out, 7)  # step 7 redone from 6 is the uninterrupted run's step 7


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_restorable_checkpoint_is_a_one_line_error_naming_the_directory(base, tmp_path, capsys, toy_tokenizer_dir):
    out = str(tmp_path / "run")
    shutil.copytree(base["full"], out)
    checkpoints = os.path.join(out, "checkpoints")
    seven = os.path.join(checkpoints, "7")
    # export / load_model of a corrupted step: one line naming the step directory, no output left behind
    _truncate_arrays(seven)
    capsys.readouterr()
    assert cli.main(["export", "--checkpoint", seven, "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"prm-jax export: error: {seven}: checkpoint does not restore: ValueError: "), err
    assert not os.path.exists(tmp_path / "hf")
    # resume with every step corrupted: the error names the directory and each step's reason
    for step in (3, 6, 7):
        _drop_meta(os.path.join(checkpoints, str(step)))
    with pytest.raises(ck.CheckpointError, match=rf"^{checkpoints}: no checkpoint restores \(step 7: .*step 3: "):
        trainer.train(base["cfg"], base["train"], out, progress=False)
    argv = ["train", "--init-config", "tiny", "--tokenizer", toy_tokenizer_dir, "--train", base["train"], "--out", out,
            "--config", TINY_RECIPE, "--quiet", *[a for s in SETS for a in ("--set", s)]]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"prm-jax train: error: {checkpoints}: no checkpoint restores"), err
    with pytest.raises(ck.CheckpointError, match=rf"^{checkpoints}/6: checkpoint does not restore: KeyError"):
        ck.load_model(out, step=6)
