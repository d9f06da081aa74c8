"""Training settings are checked before any work: every out-of-range value is a one-line error naming
the key and what was expected, and a missing --init directory is reported as such, leaving no --out."""
import json
import os

import pytest

from prm_jax import cli
from prm_jax.errors import InputError
from prm_jax.models.architectures import OBJECTIVE_ARCH
from prm_jax.models.config import Qwen2Config
from prm_jax.training.config import OptimConfig, RunConfig, TrainConfig, apply_overrides, load_config
from prm_jax.training.losses import LOSSES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RECIPE = os.path.join(REPO, "experiments", "recipes", "tiny-cpu.yaml")

BAD = [
    ("lr=-1", "optim.lr: expected > 0, got -1.0"),
    ("lr=0", "optim.lr: expected > 0, got 0.0"),
    ("lr=.nan", "optim.lr: expected > 0, got nan"),
    ("warmup_steps=-1", "optim.warmup_steps: expected >= 0, got -1"),
    ("min_lr_ratio=1.5", "optim.min_lr_ratio: expected within [0, 1], got 1.5"),
    ("weight_decay=-0.1", "optim.weight_decay: expected >= 0, got -0.1"),
    ("b1=1", "optim.b1: expected within [0, 1), got 1.0"),
    ("b2=-0.5", "optim.b2: expected within [0, 1), got -0.5"),
    ("eps=0", "optim.eps: expected > 0, got 0.0"),
    ("clip_norm=-1", "optim.clip_norm: expected >= 0 (0 or null = no clipping), got -1.0"),
    ("accum_steps=0", "optim.accum_steps: expected >= 1, got 0"),
    ("steps=0", "run.steps: expected >= 1, got 0"),
    ("seed=-3", "run.seed: expected >= 0, got -3"),
    ("log_every=0", "run.log_every: expected >= 1, got 0"),
    ("eval_every=-1", "run.eval_every: expected >= 0 (0 = only at the end), got -1"),
    ("eval_batch_size=-8", "run.eval_batch_size: expected >= 0 (0 = the micro-batch size), got -8"),
    ("save_every=-5", "run.save_every: expected >= 0 (0 = only at the end), got -5"),
    ("keep=0", "run.keep: expected >= 1, got 0"),
    ("peak_flops=0", "run.peak_flops: expected > 0 or null, got 0.0"),
    ("batch_size=0", "data.batch_size: expected >= 1, got 0"),
    ("max_length=0", "data.max_length: expected >= 1, got 0"),
    ("buckets=[64, 0]", "data.buckets: expected lengths >= 1, got (64, 0)"),
    ("group_by_length=-1", "data.group_by_length: expected >= 0 (0 = off), got -1"),
    ("model.dtype=fp8", "model.dtype: expected one of float32, bfloat16, float16, got 'fp8'"),
    ("param_dtype=int8", "model.param_dtype: expected one of float32, bfloat16, float16, got 'int8'"),
    ("remat_saves=all", "model.remat_saves: expected one of nothing, matmuls, got 'all'"),
    ("attention_impl=flash", "model.attention_impl: expected one of auto, xla, cudnn, got 'flash'"),
    ("preset=huge", "model.preset: expected one of tiny, small, qwen2_5_1_5b, qwen2_5_math_7b, got 'huge'"),
    ("warmup_steps=1001", "optim.warmup_steps: expected <= run.steps (1000), got 1001"),
]


@pytest.mark.parametrize("assignment,message", BAD)
def test_out_of_range_settings_name_the_key_and_what_was_expected(assignment, message):
    with pytest.raises(ValueError) as e:
        apply_overrides(TrainConfig(), [assignment])
    assert str(e.value) == f"--set:{message}"


def test_boundary_values_are_accepted_and_unchanged():
    cfg = apply_overrides(TrainConfig(), ["steps=1", "warmup_steps=1", "save_every=0", "eval_every=0", "clip_norm=0",
                                          "clip_norm=null", "min_lr_ratio=1", "b1=0", "weight_decay=0", "keep=1",
                                          "log_every=1", "batch_size=1", "group_by_length=0", "eval_batch_size=0"])
    assert (cfg.run.steps, cfg.optim.warmup_steps, cfg.run.save_every, cfg.optim.clip_norm) == (1, 1, 0, None)
    for recipe in ("tiny-cpu.yaml", "qwen2.5-math-7b-prm-v5p-64.yaml", "qwen2.5-math-7b-prm-8xh100.yaml"):
        load_config(os.path.join(REPO, "experiments", "recipes", recipe))
    assert set(OBJECTIVE_ARCH) == set(LOSSES)  # every objective builds an architecture
    with pytest.raises(InputError, match=r"^model preset 'huge': expected one of tiny, small, qwen2_5_1_5b, "):
        Qwen2Config.preset("huge")


def test_direct_construction_and_yaml_files_are_checked_too(tmp_path):
    with pytest.raises(ValueError, match=r"^lr: expected > 0, got -1.0$"):
        OptimConfig(lr=-1.0)
    with pytest.raises(ValueError, match=r"^steps: expected >= 1, got 0$"):
        RunConfig(steps=0)
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  save_every: -1\n")
    with pytest.raises(ValueError, match=r"bad.yaml:run.save_every: expected >= 0"):
        load_config(str(bad))


def _train_argv(tmp_path, tok, *extra):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"id": 0, "problem": "How many apples?", "steps": ["Tom has 3 apples"],
                                 "labels": [1]}) + "\n")
    return ["train", "--train", str(train), "--out", str(tmp_path / "out"), "--config", TINY_RECIPE, "--quiet",
            "--set", "steps=2", "--set", "warmup_steps=0", "--set", "max_length=64", "--set", "buckets=[64]",
            "--set", "export_hf=false", *extra]


@pytest.mark.parametrize("flags,message", [
    (["--set", "lr=-1"], "--set:optim.lr: expected > 0, got -1.0"),
    (["--set", "steps=0"], "--set:run.steps: expected >= 1, got 0"),
])
def test_cli_refuses_bad_settings_before_any_work(tmp_path, toy_tokenizer_dir, capsys, flags, message):
    argv = _train_argv(tmp_path, toy_tokenizer_dir, "--init-config", "tiny", "--tokenizer", toy_tokenizer_dir, *flags)
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip() == f"prm-jax train: error: {message}"
    assert not os.path.exists(tmp_path / "out")


def test_missing_init_dir_is_one_line_and_leaves_no_out_dir(tmp_path, toy_tokenizer_dir, capsys):
    missing = str(tmp_path / "no-such-model")
    assert cli.main(_train_argv(tmp_path, toy_tokenizer_dir, "--init", missing)) == 2
    assert capsys.readouterr().err.strip() == (f"prm-jax train: error: --init {missing}: no such directory; expected a local "
                                               "Hugging Face model directory")
    assert not os.path.exists(tmp_path / "out")
    empty = tmp_path / "empty-model"
    empty.mkdir()
    assert cli.main(_train_argv(tmp_path, toy_tokenizer_dir, "--init", str(empty))) == 2
    assert "no config.json in it" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")
    missing_tok = str(tmp_path / "no-such-tokenizer")
    assert cli.main(_train_argv(tmp_path, toy_tokenizer_dir, "--init-config", "tiny", "--tokenizer", missing_tok)) == 2
    assert capsys.readouterr().err.strip().startswith(f"prm-jax train: error: tokenizer {missing_tok}: no such directory")
    assert not os.path.exists(tmp_path / "out")
