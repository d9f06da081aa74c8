"""Hugging Face interop against transformers (torch, float32) as the independent reference."""
import json
import shutil

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import load_file as torch_load_file
from transformers import AutoTokenizer
from transformers import Qwen2Config as HFConfig
from transformers import Qwen2ForCausalLM as HFCausalLM
from transformers import Qwen2Model as HFModel

from prm_jax import load_causal_lm, load_prm, save_hf
from prm_jax.models.hf import CheckpointError, load_tokenizer
from prm_jax.models.prm import Qwen2PRM
from prm_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM

TOL = 1e-4
VOCAB = 96

CONFIGS = {  # name -> transformers config kwargs
    "gqa_untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mha_tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "gqa_tied_headdim": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, head_dim=24,
                             rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
}


def hf_config(**kw) -> HFConfig:
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=2, rms_norm_eps=1e-6,
                max_position_embeddings=128, initializer_range=0.08)
    return HFConfig(**{**base, **kw})


def perturbed_hf(hc: HFConfig, seed: int) -> HFCausalLM:
    """Random init leaves norms at 1 and biases at 0; move them so every weight matters."""
    torch.manual_seed(seed)
    m = HFCausalLM(hc).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
    return m


def random_ours(cls, cfg: Qwen2Config, seed: int) -> nnx.Module:
    """Our model with every weight drawn at random on the host (norm scales around 1, biases non-zero);
    built abstractly first so no init code is compiled."""
    rng = np.random.RandomState(seed)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(cfg, nnx.Rngs(0))))
    flat = []
    for path, var in nnx.to_flat_state(state):
        sds = var.get_value()
        new = (1 + 0.3 * rng.randn(*sds.shape)) if path[-1] == "scale" else 0.08 * rng.randn(*sds.shape)
        flat.append((path, var.replace(jax.numpy.asarray(new.astype(sds.dtype)))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def run(model, ids, mask):
    """(logits, final hidden states) from one jitted forward; one compile per model structure is far
    cheaper than eager op-by-op dispatch on first use."""
    graphdef, state = nnx.split(model)
    if graphdef not in _JIT_CACHE:
        def fwd(state, ids, mask):
            m = nnx.merge(graphdef, state)
            hidden = m.model(ids, mask)
            return (m.score(hidden) if isinstance(m, Qwen2PRM) else m.logits(hidden)), hidden
        _JIT_CACHE[graphdef] = jax.jit(fwd)
    return jax.tree.map(np.asarray, _JIT_CACHE[graphdef](state, ids, mask))


_JIT_CACHE = {}


def ragged_batch(seed: int = 0):
    """Right-padded ragged batch: lengths 11, 7, 3."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, VOCAB, (3, 11))
    mask = np.zeros((3, 11), np.int32)
    for row, n in enumerate((11, 7, 3)):
        mask[row, :n] = 1
    ids[mask == 0] = 0
    return ids, mask


def torch_logits(m, ids, mask):
    with torch.no_grad():
        out = m(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    # transformers' last hidden_states entry is the final-norm output (what our backbone returns)
    return out.logits.numpy(), out.hidden_states[-1].numpy()


def max_diff_valid(a, b, mask):
    return float(np.abs(np.asarray(a) - np.asarray(b))[np.asarray(mask) == 1].max())


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf_dir(request, tmp_path_factory):
    hc = hf_config(**CONFIGS[request.param])
    m = perturbed_hf(hc, seed=len(request.param))
    d = tmp_path_factory.mktemp(request.param)
    m.save_pretrained(d)
    return d, m


def test_logit_and_hidden_parity(hf_dir):
    d, ref = hf_dir
    ids, mask = ragged_batch()
    ref_logits, ref_hidden = torch_logits(ref, ids, mask)
    assert np.abs(ref_logits).max() > 0.5  # a meaningful scale for the tolerance
    ours = load_causal_lm(d)
    assert ours.cfg.tie_word_embeddings == ref.config.tie_word_embeddings
    assert (ours.lm_head is None) == ref.config.tie_word_embeddings
    assert max_diff_valid(run(ours, ids, mask)[0], ref_logits, mask) <= TOL
    assert max_diff_valid(run(ours, ids, mask)[1], ref_hidden, mask) <= TOL


def test_transformers_import_export_identical(hf_dir, tmp_path):
    d, ref = hf_dir
    out = save_hf(load_causal_lm(d), tmp_path / "export")
    a, b = torch_load_file(d / "model.safetensors"), torch_load_file(out / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]


def test_sharded_transformers_checkpoint_roundtrip_bf16(tmp_path):
    """A bf16 transformers checkpoint sharded with an index -> import (kept bf16) -> sharded export: same tensors."""
    m = perturbed_hf(hf_config(**CONFIGS["gqa_untied"]), seed=3).to(torch.bfloat16)
    m.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ours = load_causal_lm(tmp_path / "hf")
    assert ours.cfg.param_dtype == "bfloat16"
    out = save_hf(ours, tmp_path / "ours", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1

    def tensors(directory):
        files = set(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"].values())
        return {k: v for f in files for k, v in torch_load_file(directory / f).items()}

    a, b = tensors(tmp_path / "hf"), tensors(out)
    assert sorted(a) == sorted(b) and sorted(a) == sorted(index["weight_map"])
    for k in a:
        assert a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("tied,shard", [(False, None), (True, 30_000)])
def test_export_then_transformers_from_pretrained(tmp_path, tied, shard):
    cfg = Qwen2Config.preset("tiny", vocab_size=VOCAB, tie_word_embeddings=tied, rope_theta=10_000.0)
    ours = random_ours(Qwen2ForCausalLM, cfg, seed=1)
    ids, mask = ragged_batch(1)
    expected = run(ours, ids, mask)[0]
    out = save_hf(ours, tmp_path, **({"max_shard_bytes": shard} if shard else {}))
    assert (out / "model.safetensors.index.json").is_file() == bool(shard)
    ref = HFCausalLM.from_pretrained(out).eval()
    assert ref.config.tie_word_embeddings == tied
    logits, _ = torch_logits(ref, ids, mask)
    assert max_diff_valid(expected, logits, mask) <= TOL


def test_prm_matches_torch_reference(tmp_path):
    cfg = Qwen2Config.preset("tiny", vocab_size=VOCAB, rope_theta=10_000.0)
    prm = random_ours(Qwen2PRM, cfg, seed=2)
    ids, mask = ragged_batch(2)
    ours = run(prm, ids, mask)[0]
    out = save_hf(prm, tmp_path)
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["architectures"] == ["Qwen2ForProcessRewardModel"] and cfg_json["num_labels"] == 2
    weights = torch_load_file(out / "model.safetensors")
    assert not any(k.startswith("lm_head") for k in weights)
    assert {k for k in weights if k.startswith("score")} == {"score.0.weight", "score.0.bias",
                                                            "score.2.weight", "score.2.bias"}

    # reference: transformers' Qwen2Model + Linear(h,h) -> ReLU -> Linear(h,2) from the exported tensors
    backbone = HFModel.from_pretrained(out).eval()
    h = cfg.hidden_size
    score = torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, 2))
    score.load_state_dict({k[len("score."):]: v for k, v in weights.items() if k.startswith("score.")})
    torch.testing.assert_close(backbone.embed_tokens.weight, weights["model.embed_tokens.weight"])
    with torch.no_grad():
        hidden = backbone(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
        ref = score(hidden).numpy()
    assert np.abs(ref).max() > 0.1
    assert max_diff_valid(ours, ref, mask) <= TOL

    reloaded = load_prm(out)  # our own PRM checkpoint loads back as a PRM
    assert max_diff_valid(run(reloaded, ids, mask)[0], ref, mask) <= TOL
    with pytest.raises(CheckpointError, match="load_prm"):
        load_causal_lm(out)


def test_prm_from_causal_lm_checkpoint(hf_dir):
    d, ref = hf_dir
    prm = load_prm(d)
    sd = ref.state_dict()
    np.testing.assert_array_equal(prm.model.embed_tokens.embedding[...], sd["model.embed_tokens.weight"].numpy())
    np.testing.assert_array_equal(prm.model.layers[1].mlp.down_proj.kernel[...],
                                  sd["model.layers.1.mlp.down_proj.weight"].numpy().T)
    np.testing.assert_array_equal(prm.model.layers[0].self_attn.k_proj.bias[...],
                                  sd["model.layers.0.self_attn.k_proj.bias"].numpy())
    ids, mask = ragged_batch()
    _, ref_hidden = torch_logits(ref, ids, mask)
    assert max_diff_valid(run(prm, ids, mask)[1], ref_hidden, mask) <= TOL
    h = ref.config.hidden_size
    assert prm.score.dense_in.kernel.shape == (h, h) and prm.score.dense_out.kernel.shape == (h, 2)
    assert float(np.std(prm.score.dense_in.kernel[...])) > 0  # freshly initialised, not zeros
    again = load_prm(d)  # the fresh head comes from a fixed seed
    np.testing.assert_array_equal(prm.score.dense_out.kernel[...], again.score.dense_out.kernel[...])


def test_compute_dtype_override(hf_dir):
    d, _ = hf_dir
    m = load_causal_lm(d, dtype="bfloat16")
    assert m.cfg.dtype == "bfloat16" and m.cfg.param_dtype == "float32"
    assert m.model.embed_tokens.embedding[...].dtype == np.float32
    m2 = load_causal_lm(d, param_dtype="bfloat16")
    assert m2.model.layers[0].mlp.up_proj.kernel[...].dtype.name == "bfloat16" and m2.cfg.dtype == "bfloat16"


def test_tokenizer_copied_and_loadable(tmp_path, toy_tokenizer_dir, toy_tokenizer):
    ours = random_ours(Qwen2ForCausalLM, Qwen2Config.preset("tiny", vocab_size=len(toy_tokenizer)), seed=0)
    out = save_hf(ours, tmp_path, tokenizer_dir=toy_tokenizer_dir)
    tok = load_tokenizer(out)
    text = "3 + 12 = 15. The answer is \\boxed{15}."
    assert tok.encode(text) == toy_tokenizer.encode(text)
    assert tok.convert_tokens_to_ids("<extra_0>") == toy_tokenizer.convert_tokens_to_ids("<extra_0>")


def test_official_prm_step_token_is_checked(tmp_path, qwen25_tokenizer_dir):
    """A PRM checkpoint in the official (Qwen2.5) vocabulary whose tokenizer has `<extra_0>` appended as a new
    id (151665, what a Qwen2.5 init got before the rename) rather than at 151651 is refused, before any weight
    is read (so a header-only weights file is enough here)."""
    cfg = Qwen2Config(vocab_size=151_936, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                      num_kv_heads=1)
    hf = {**cfg.to_hf(), "architectures": ["Qwen2ForProcessRewardModel"], "num_labels": 2}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    np_save_file({"score.0.weight": np.zeros((8, 8), np.float32)}, tmp_path / "model.safetensors")
    tok = AutoTokenizer.from_pretrained(qwen25_tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<extra_0>"]}, replace_extra_special_tokens=False)
    tok.save_pretrained(tmp_path)
    assert tok.convert_tokens_to_ids("<extra_0>") == 151_665
    with pytest.raises(CheckpointError, match=r"'<extra_0>' to 151665.*official Qwen2\.5 vocabulary.*151651"):
        load_prm(tmp_path)


# -- bad input --------------------------------------------------------------------------------

@pytest.fixture()
def good_dir(tmp_path):
    m = perturbed_hf(hf_config(**CONFIGS["gqa_untied"]), seed=0)
    d = tmp_path / "good"
    m.save_pretrained(d)
    return d


def test_missing_config(good_dir):
    (good_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: not found"):
        load_causal_lm(good_dir)


def test_missing_weights_file(good_dir):
    (good_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"good: no model\.safetensors or model\.safetensors\.index\.json"):
        load_causal_lm(good_dir)


def test_missing_shard(tmp_path):
    perturbed_hf(hf_config(**CONFIGS["gqa_untied"]), seed=0).save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = index["weight_map"]["model.norm.weight"]
    (tmp_path / victim).unlink()
    with pytest.raises(CheckpointError, match=rf"index\.json: key '.*' maps to shard '{victim}', which is missing"):
        load_causal_lm(tmp_path)


def test_corrupt_header(good_dir):
    f = good_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\xff" * 12
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        load_causal_lm(good_dir)


def test_truncated_file_names_tensor(good_dir):
    f = good_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.*': data_offsets .*truncated"):
        load_causal_lm(good_dir)


def test_empty_file(good_dir):
    (good_dir / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors file"):
        load_causal_lm(good_dir)


def _rewrite(directory, edit):
    from safetensors.numpy import load_file as np_load_file
    tensors = np_load_file(directory / "model.safetensors")
    edit(tensors)
    np_save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_wrong_shape_tensor(good_dir):
    key = "model.layers.1.self_attn.k_proj.weight"
    _rewrite(good_dir, lambda t: t.__setitem__(key, np.zeros((16, 64), np.float32)))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{key}' has shape \[16, 64\], "
                                              r"expected \[32, 64\]"):
        load_causal_lm(good_dir)


def test_missing_tensor(good_dir):
    key = "model.layers.0.mlp.gate_proj.weight"
    _rewrite(good_dir, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: missing tensor '{key}'"):
        load_causal_lm(good_dir)


def test_missing_lm_head_untied(good_dir):
    _rewrite(good_dir, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'lm_head\.weight'"):
        load_causal_lm(good_dir)


@pytest.mark.parametrize("key,value", [("use_sliding_window", True),
                                       ("rope_scaling", {"type": "linear", "factor": 2.0}),
                                       ("model_type", "llama")])
def test_unsupported_config(good_dir, key, value):
    cfg_file = good_dir / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg[key] = value
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"config\.json: key '{key}'"):
        load_causal_lm(good_dir)


def test_missing_config_key(good_dir):
    cfg_file = good_dir / "config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["hidden_size"]
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: missing key 'hidden_size'"):
        load_causal_lm(good_dir)


def test_tokenizer_dir_without_tokenizer(tmp_path, good_dir):
    ours = random_ours(Qwen2ForCausalLM, Qwen2Config.preset("tiny", vocab_size=VOCAB), seed=0)
    shutil.rmtree(good_dir)
    good_dir.mkdir()
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        save_hf(ours, tmp_path / "out", tokenizer_dir=good_dir)
