"""Losses vs torch, loss masking, packing, mesh/accumulation equivalence, learning, divergence, config."""
import json
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from prm_jax.data import pipeline as pl
from prm_jax.data.prm_format import resolve_step_token
from prm_jax.models.prm import Qwen2PRM
from prm_jax.models.qwen2 import Qwen2Config
from prm_jax.parallel.mesh import make_mesh
from prm_jax.training import losses, trainer
from prm_jax.training import metrics as tm
from prm_jax.training import step as ts
from prm_jax.training.config import TrainConfig, apply_overrides, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RECIPE = os.path.join(REPO, "experiments", "recipes", "tiny-cpu.yaml")

# A learnable labelling: a step is "correct" iff it talks about apples.
GOOD = ["Tom has 3 apples", "he buys 12 more apples", "apples 15"]
BAD = ["15 * 4 = 60", "60 - 7 = 53", "56 / 2 = 28"]


def toy_records(n, seed):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(1, 3)
        steps, labels = [], []
        for _ in range(k):
            good = rng.random() < 0.5
            steps.append(rng.choice(GOOD if good else BAD))
            labels.append(int(good))
        out.append({"id": f"r{seed}-{i}", "problem": "How many apples?", "steps": steps, "labels": labels})
    return out


def write(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


# -- losses vs torch ------------------------------------------------------------------------------

def _logits_labels(seed=0, shape=(3, 7), classes=2, soft=False):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(*shape, classes)).astype(np.float32) * 2
    mask = rng.random(shape) < 0.4
    mask[0, 0] = True
    if soft:
        y = rng.random(shape).astype(np.float32)
        y[0, 0] = 1.0
        labels = np.where(mask, y, -100.0).astype(np.float32)
    else:
        labels = np.where(mask, rng.integers(0, classes, shape), -100).astype(np.int32)
    return logits, labels, mask


def test_hard_and_lm_cross_entropy_match_torch():
    for classes, fn in ((2, losses.prm_hard), (37, losses.causal_lm)):
        logits, labels, mask = _logits_labels(1, classes=classes)
        total, n, correct = fn(jnp.asarray(logits), jnp.asarray(labels))
        ref = F.cross_entropy(torch.tensor(logits).reshape(-1, classes), torch.tensor(labels).reshape(-1).long(),
                              ignore_index=-100, reduction="sum")
        np.testing.assert_allclose(float(total), ref.item(), rtol=1e-5)
        assert int(n) == mask.sum()
        assert int(correct) == ((logits.argmax(-1) == labels) & mask).sum()


def test_soft_bce_matches_torch():
    logits, labels, mask = _logits_labels(2, soft=True)
    total, n, correct = losses.prm_soft(jnp.asarray(logits), jnp.asarray(labels))
    p = torch.softmax(torch.tensor(logits), -1)[..., 1][torch.tensor(mask)]
    y = torch.tensor(labels)[torch.tensor(mask)]
    ref = F.binary_cross_entropy(p.double(), y.double(), reduction="sum")
    np.testing.assert_allclose(float(total), ref.item(), rtol=1e-5)
    assert int(n) == mask.sum()
    assert int(correct) == int(((p > 0.5) == (y > 0.5)).sum())


def test_class_weighted_losses_match_torch_and_balance_the_classes():
    w = (3.0, 0.6)
    logits, labels, mask = _logits_labels(4)
    total = losses.prm_hard(jnp.asarray(logits), jnp.asarray(labels), class_weights=w)[0]
    ref = F.cross_entropy(torch.tensor(logits).reshape(-1, 2), torch.tensor(labels).reshape(-1).long(),
                          weight=torch.tensor(w), ignore_index=-100, reduction="sum")
    np.testing.assert_allclose(float(total), ref.item(), rtol=1e-5)
    logits, labels, mask = _logits_labels(5, soft=True)
    total = losses.prm_soft(jnp.asarray(logits), jnp.asarray(labels), class_weights=w)[0]
    p = torch.softmax(torch.tensor(logits), -1)[..., 1][torch.tensor(mask)].double()
    y = torch.tensor(labels)[torch.tensor(mask)].double()
    ref = F.binary_cross_entropy(p, y, weight=torch.where(y > 0.5, w[1], w[0]).double(), reduction="sum")
    np.testing.assert_allclose(float(total), ref.item(), rtol=1e-5)
    # 1 wrong step, 3 right ones: N / (2 N_class) = 4/2 and 4/6.
    ex = [{"labels": np.array([-100, 1, -100, 0], np.int32)}, {"labels": np.array([1, 1, -100], np.int32)}]
    assert losses.balanced_class_weights(ex) == (2.0, 4 / 6)
    assert losses.balanced_class_weights(ex[1:]) == (1.0, 1.0)


def test_positions_without_a_label_do_not_affect_the_loss():
    logits, labels, mask = _logits_labels(3)
    other = np.where(mask[..., None], logits, np.random.default_rng(9).normal(size=logits.shape) * 50).astype(np.float32)
    for fn, lab in ((losses.prm_hard, labels), (losses.prm_soft, np.where(mask, labels.astype(np.float32), -100.0))):
        a = fn(jnp.asarray(logits), jnp.asarray(lab))[0]
        b = fn(jnp.asarray(other), jnp.asarray(lab))[0]
        assert float(a) == float(b)
        g = jax.grad(lambda x, fn=fn, lab=lab: fn(x, jnp.asarray(lab))[0])(jnp.asarray(logits))
        assert (np.asarray(g)[~mask] == 0).all() and (np.abs(np.asarray(g)[mask]).sum(-1) > 0).all()


# -- model-level equivalences --------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_examples(tmp_path_factory, toy_tokenizer):
    path = write(tmp_path_factory.mktemp("data") / "t.jsonl", toy_records(16, 0))
    opts = pl.EncodeOptions(objective="prm", max_length=64, step_token_id=resolve_step_token(toy_tokenizer),
                            step_token_text="<extra_0>", system_prompt=None)
    return pl.encode_records(toy_tokenizer, path, opts).examples


def tiny_model_cfg():
    return Qwen2Config.preset("tiny", vocab_size=320)


def test_packed_and_unpacked_batches_give_the_same_loss(toy_examples):
    cfg = tiny_model_cfg()
    graphdef, state = nnx.split(Qwen2PRM(cfg, nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)
    exs = toy_examples[:3]
    width = sum(len(e["input_ids"]) for e in exs) + 5
    unpacked = pl.pad_examples(exs, (width,), pad_id=0)
    # The same three examples packed into row 0 (rows 1-2 empty, so both batches share one shape
    # and one compilation), built by hand, independent of grain's packer.
    packed = {k: np.zeros((3, width), np.int32) for k in ("input_ids", "segment_ids", "positions")}
    packed["labels"] = np.full((3, width), -100, np.int32)
    at = 0
    for s, e in enumerate(exs, start=1):
        n = len(e["input_ids"])
        packed["input_ids"][0, at:at + n] = e["input_ids"]
        packed["labels"][0, at:at + n] = e["labels"]
        packed["segment_ids"][0, at:at + n] = s
        packed["positions"][0, at:at + n] = np.arange(n)
        at += n
    f = jax.jit(lambda p, b: ts._forward_loss(graphdef, losses.prm_hard, p, b))
    lu, nu, cu = f(params, {k: jnp.asarray(v) for k, v in unpacked.items()})
    lp, np_, cp = f(params, {k: jnp.asarray(v) for k, v in packed.items()})
    assert int(nu) == int(np_) == sum(int((e["labels"] != -100).sum()) for e in exs)
    np.testing.assert_allclose(float(lp), float(lu), rtol=1e-5)
    assert int(cu) == int(cp)


def _run_steps(cfg_train, mesh, params0, batches, accum):
    """Two optimizer steps of the jitted train step on `mesh`; returns host params and metrics."""
    model_cfg = tiny_model_cfg()
    graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: Qwen2PRM(model_cfg, nnx.Rngs(0))))
    from prm_jax.parallel.mesh import state_shardings
    psh = nnx.to_pure_dict(state_shardings(abs_state, mesh))
    tx = ts.make_optimizer(cfg_train)
    osh, _ = ts.opt_state_shardings(tx, nnx.to_pure_dict(abs_state), psh, mesh)
    params = jax.device_put(params0, psh)
    opt_state = jax.jit(tx.init, out_shardings=osh)(params)
    step = ts.make_train_step(graphdef, "prm", tx, mesh, psh, osh)
    out = []
    for b in batches:
        params, opt_state, m = step(params, opt_state, pl.place_batch(b, mesh, accum))
        out.append(jax.device_get(m))
    return jax.device_get(params), out


def test_mesh_step_with_accumulation_equals_single_device_step(toy_examples):
    """Two AdamW steps on a (2,2,2) mesh with 2 accumulation micro-batches vs one device and the
    whole batch at once: the same loss, gradient norm and parameters (up to f32 summation order)."""
    cfg = apply_overrides(TrainConfig(), ["lr=1e-2", "warmup_steps=0", "steps=4", "clip_norm=0.5"])
    params0 = jax.device_get(nnx.to_pure_dict(nnx.state(Qwen2PRM(tiny_model_cfg(), nnx.Rngs(1)))))
    batches = [pl.pad_examples(toy_examples[i:i + 8], (64,), 0) for i in (0, 8)]
    one = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    p1, m1 = _run_steps(cfg, one, params0, batches, accum=1)
    p8, m8 = _run_steps(cfg, make_mesh((2, 2, 2)), params0, batches, accum=2)
    for a, b in zip(m1, m8):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
        assert a["labels"] == b["labels"] and a["ok"] and b["ok"]
    moved = 0.0
    for x, y, x0 in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), jax.tree.leaves(params0)):
        # Adam divides by sqrt(v): where a gradient is ~0, summation-order noise can move an element
        # by a fraction of the step size (lr = 1e-2), hence atol = 0.5% of lr.
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=5e-5)
        moved = max(moved, float(np.abs(x - x0).max()))
    assert moved > 1e-3  # the steps really changed the parameters


# -- whole runs -----------------------------------------------------------------------------------

def _cfg(tok_dir, *sets):
    return apply_overrides(load_config(TINY_RECIPE), [f"model.tokenizer={tok_dir}", *sets])


def test_training_learns_a_toy_labelling_and_logs_metrics(tmp_path, toy_tokenizer_dir):
    train_file = write(tmp_path / "train.jsonl", toy_records(96, 1))
    eval_file = write(tmp_path / "eval.jsonl", toy_records(24, 2))
    cfg = _cfg(toy_tokenizer_dir, "steps=30", "log_every=5", "eval_every=0", "save_every=30", "max_length=64",
               "buckets=[64]", "class_balance=true")
    out = str(tmp_path / "run")
    s = trainer.train(cfg, train_file, out, eval_file=eval_file, devices=jax.devices()[:1], progress=False)
    labels = [y for r in toy_records(96, 1) for y in r["labels"]]
    assert s["data"]["dropped_step_labels"] == 0
    assert s["class_weights"] == pytest.approx([len(labels) / (2 * labels.count(0)), len(labels) / (2 * sum(labels))])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    train_rows = [r for r in rows if r.get("split") != "eval"]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20, 25, 30]
    for key in ("loss", "step_accuracy", "grad_norm", "lr", "tokens_per_s", "padded_tokens_per_s", "mfu"):
        assert key in train_rows[0]
    assert train_rows[0]["padded_tokens_per_s"] >= train_rows[0]["tokens_per_s"] > 0
    assert train_rows[-1]["loss"] < 0.5 * train_rows[0]["loss"]
    assert s["status"] == "completed" and s["eval_step_accuracy"] > 0.75, s  # chance is 0.5
    assert rows[-1]["split"] == "eval" and rows[-1]["step"] == 30
    with open(os.path.join(out, "hf", "config.json")) as f:
        assert json.load(f)["architectures"] == ["Qwen2ForProcessRewardModel"]


def test_policy_lm_objective_learns(tmp_path, toy_tokenizer_dir):
    recs = [{"id": i, "problem": "How many apples?", "steps": ["Tom has 3 apples", "The answer is 3"]}
            for i in range(16)]
    cfg = _cfg(toy_tokenizer_dir, "steps=12", "lr=1e-2", "log_every=4", "save_every=0", "max_length=64", "buckets=[64]",
               "export_hf=false")
    out = str(tmp_path / "lm")
    trainer.train(cfg, write(tmp_path / "lm.jsonl", recs), out, objective="lm", devices=jax.devices()[:1],
                  progress=False)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, toy_tokenizer_dir):
    from prm_jax.training.checkpoint import Checkpointer

    cfg = _cfg(toy_tokenizer_dir, "steps=3", "lr=1e30", "warmup_steps=0", "clip_norm=null", "save_every=1",
               "max_length=64", "buckets=[64]", "log_every=1")
    out = str(tmp_path / "nan")
    with pytest.raises(trainer.TrainingDiverged, match=r"non-finite loss, gradient or update at step 2.*checkpoints/1"):
        trainer.train(cfg, write(tmp_path / "t.jsonl", toy_records(32, 3)), out, devices=jax.devices()[:1],
                      progress=False)
    ck = Checkpointer(os.path.join(out, "checkpoints"))
    assert ck.all_steps() == [1]
    meta = ck.read_meta(1)
    from prm_jax.training.checkpoint import abstract_like, build_abstract
    _, abstract, _ = build_abstract(meta)
    params = ck.restore(1, abstract_like(abstract))[0]
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(params))
    ck.close()


# -- config, FLOPs --------------------------------------------------------------------------------

def test_yaml_config_and_set_overrides(tmp_path):
    cfg = apply_overrides(load_config(TINY_RECIPE), ["steps=7", "batch_size=16", "lr=2e-6", "seed=3",
                                                     "save_every=2", "max_length=96", "mesh=data=2,fsdp=2,tensor=2",
                                                     "buckets=[32, 96]", "model.dtype=bfloat16"])
    assert (cfg.run.steps, cfg.data.batch_size, cfg.optim.lr, cfg.run.seed, cfg.run.save_every) == (7, 16, 2e-6, 3, 2)
    assert (cfg.data.max_length, cfg.run.mesh, cfg.data.buckets, cfg.model.dtype) == \
        (96, "data=2,fsdp=2,tensor=2", (32, 96), "bfloat16")
    with pytest.raises(ValueError, match="unknown key"):
        apply_overrides(cfg, ["stepz=3"])
    with pytest.raises(ValueError, match="run.steps: expected an integer"):
        apply_overrides(cfg, ["steps=many"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(ValueError, match=r"bad.yaml:optim: unknown key 'learning_rate'"):
        load_config(str(bad))
    for recipe in ("qwen2.5-math-7b-prm-v5p-64.yaml", "qwen2.5-math-7b-prm-8xh100.yaml"):
        load_config(os.path.join(REPO, "experiments", "recipes", recipe))


def test_flop_formula_counts_every_matmul_parameter():
    for arch, cls in (("prm", Qwen2PRM), ("lm", None)):
        from prm_jax.models.qwen2 import Qwen2ForCausalLM
        cls = cls or Qwen2ForCausalLM
        cfg = tiny_model_cfg()
        state = nnx.to_flat_state(nnx.state(cls(cfg, nnx.Rngs(0))))
        kernels = sum(int(np.prod(v.get_value().shape)) for p, v in state if p[-1] == "kernel")
        assert tm.matmul_params(cfg, arch) == kernels
        T = 64
        attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_size * T
        assert tm.train_flops_per_token(cfg, arch, T) == 6 * kernels + attention
    assert tm.peak_flops_per_device("TPU v5p") == 459e12
    assert tm.peak_flops_per_device("cpu") is None and tm.peak_flops_per_device("cpu", 1e12) == 1e12


def test_dense_matmul_backward_equals_autodiff():
    from prm_jax.models.linear import matmul

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(7, 3)), jnp.float32)
    loss = lambda mm: lambda x_, w_: jnp.sum(jnp.sin(mm(x_, w_)))  # noqa: E731
    ours = jax.grad(loss(matmul), argnums=(0, 1))(x, w)
    ref = jax.grad(loss(lambda a, b: a @ b), argnums=(0, 1))(x, w)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_attention_backward_equals_torch_autograd():
    """The hand-written attention backward against torch autograd of the same attention (GQA,
    causal + same-segment mask as in packed rows), in f32."""
    from prm_jax.models.attention import attention

    rng = np.random.default_rng(0)
    b, t, h, kv, d = 2, 12, 4, 2, 8
    q, w = (rng.normal(size=(b, t, h, d)).astype(np.float32) for _ in range(2))
    k, v = (rng.normal(size=(b, kv, t, d)).astype(np.float32) for _ in range(2))
    segments = np.array([[1] * 7 + [2] * 5, [1] * 12])
    mask = np.tril(np.ones((t, t), bool)) & (segments[:, :, None] == segments[:, None, :])

    ours = jax.grad(lambda *a: jnp.sum(attention(*a, jnp.asarray(mask)) * w), argnums=(0, 1, 2))(
        *map(jnp.asarray, (q, k, v)))
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    out = F.scaled_dot_product_attention(tq.transpose(1, 2), tk, tv, attn_mask=torch.tensor(mask)[:, None],
                                         enable_gqa=True)
    (out.transpose(1, 2) * torch.tensor(w)).sum().backward()
    for a, ref in zip(ours, (tq, tk, tv)):
        np.testing.assert_allclose(np.asarray(a), ref.grad.numpy(), rtol=1e-4, atol=1e-5)
