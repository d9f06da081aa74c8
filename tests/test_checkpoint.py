"""Orbax checkpoints: SIGTERM save + resume is bitwise-identical to an uninterrupted run, the last
K steps are kept, and any saved step exports to the Hugging Face layout."""
import json
import os
import signal

import jax
import numpy as np
import pytest

from conftest import TINY_RECIPE, toy_records
from prm_jax import cli
from prm_jax.training import checkpoint as ck
from prm_jax.training.config import apply_overrides, load_config
from prm_jax.training.trainer import train

SETS = ["steps=4", "save_every=2", "keep=2", "log_every=1", "max_length=64", "buckets=[64]", "lr=1e-2", "mesh=fsdp=2",
        "export_hf=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, toy_tokenizer_dir):
    """An uninterrupted 4-step run, and the same run stopped by SIGTERM after step 1."""
    root = tmp_path_factory.mktemp("ckpt")
    train_file = str(root / "train.jsonl")
    with open(train_file, "w") as f:
        for r in toy_records(40, 0):
            f.write(json.dumps(r) + "\n")
    cfg = apply_overrides(load_config(TINY_RECIPE), [f"model.tokenizer={toy_tokenizer_dir}", *SETS])
    full = train(cfg, train_file, str(root / "full"), progress=False)

    def sigterm_after_step_1(step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal: the handler flags it, the loop saves and stops

    stopped = train(cfg, train_file, str(root / "stopped"), callbacks=[sigterm_after_step_1], progress=False)
    return {"root": root, "train": train_file, "tok": toy_tokenizer_dir, "full": full, "stopped": stopped}


def _restore_all(out_dir, step):
    c = ck.Checkpointer(os.path.join(out_dir, "checkpoints"))
    r = c.manager.restore(step)  # every item, exactly as stored
    c.close()
    return r


def test_sigterm_saves_and_resume_is_bitwise_identical(runs):
    assert runs["full"]["status"] == "completed" and runs["full"]["step"] == 4
    stopped = runs["stopped"]
    assert stopped["status"] == "preempted" and stopped["step"] == 1
    out = str(runs["root"] / "stopped")
    assert ck.Checkpointer(os.path.join(out, "checkpoints")).all_steps() == [1]
    # Resume through the CLI, as a rerun of the same command would.
    code = cli.main(["train", "--init-config", "tiny", "--tokenizer", runs["tok"], "--train", runs["train"],
                     "--out", out, "--config", TINY_RECIPE, "--quiet", *[a for s in SETS for a in ("--set", s)]])
    assert code == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["resumed_from"] == 1 and summary["step"] == 4
    a = _restore_all(str(runs["root"] / "full"), 4)
    b = _restore_all(out, 4)
    for key in ("params", "opt_state"):
        la, lb = jax.tree.leaves(a[key]), jax.tree.leaves(b[key])
        assert len(la) == len(lb) > 0
        for x, y in zip(la, lb):
            assert np.array_equal(np.asarray(x), np.asarray(y)), key  # bitwise
    assert a["data"] == b["data"]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    full_rows = [json.loads(line) for line in open(str(runs["root"] / "full" / "metrics.jsonl"))]
    assert [r["loss"] for r in rows] == [r["loss"] for r in full_rows]


def test_keeps_the_last_k_steps(runs):
    assert ck.Checkpointer(str(runs["root"] / "full" / "checkpoints")).all_steps() == [2, 4]


def test_export_any_saved_step_to_hf(runs, tmp_path):
    from prm_jax.models import hf

    step_dir = str(runs["root"] / "full" / "checkpoints" / "2")
    out = str(tmp_path / "hf2")
    assert cli.main(["export", "--checkpoint", step_dir, "--out", out]) == 0
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == ["Qwen2ForProcessRewardModel"]
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    saved = _restore_all(str(runs["root"] / "full"), 2)["params"]
    from flax import nnx
    loaded = nnx.to_pure_dict(nnx.state(hf.load_prm(out)))
    flat_saved = dict(jax.tree_util.tree_flatten_with_path(saved)[0])
    flat_loaded = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
    assert len(flat_saved) == len(flat_loaded)
    for (path, x) in jax.tree_util.tree_flatten_with_path(loaded)[0]:
        key = tuple(str(getattr(k, "key", k)) for k in path)
        match = [v for p, v in flat_saved.items() if tuple(str(getattr(k, "key", k)) for k in p) == key]
        assert len(match) == 1 and np.array_equal(np.asarray(x), np.asarray(match[0])), key
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 3"):
        ck.export_hf(str(runs["root"] / "full"), str(tmp_path / "none"), step=3)
