"""A PRM export is a PRM to transformers (our modeling file through auto_map), and a PRM built from a Qwen2.5
tokenizer takes the released Qwen2.5-Math-PRM's step-token layout (`<extra_0>` at 151651).

References: transformers (torch, float32) running the exported directory; the released model's layout as
published (151651 = `<extra_0>` in its tokenizer files, vLLM's step_tag_id default)."""
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import load_file as torch_load_file
from test_hf import random_ours, run
from transformers import AutoModel, AutoModelForTokenClassification, AutoTokenizer

from prm_jax import load_prm, save_hf
from prm_jax.data.prm_format import encode_prm, resolve_step_token
from prm_jax.evaluation.scoring import score_steps
from prm_jax.models import hf as hf_mod
from prm_jax.models.hf import CheckpointError
from prm_jax.models.prm import Qwen2PRM, step_rewards
from prm_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM

TOL = 1e-5
VOCAB = 96
STEP = 7  # the step token id of the small-vocabulary models
QWEN_VOCAB = 151_936  # the Qwen2.5 embedding size
OFFICIAL = 151_651

SMALL = {  # name -> our config overrides (tied embeddings on/off, GQA and MHA)
    "gqa_untied": dict(num_heads=4, num_kv_heads=2, tie_word_embeddings=False),
    "gqa1_tied": dict(num_heads=4, num_kv_heads=1, tie_word_embeddings=True),
    "mha_tied": dict(num_heads=4, num_kv_heads=4, tie_word_embeddings=True),
}


def ragged_steps(seed: int):
    """Right-padded ragged batch (lengths 13, 9, 4) with step tokens inside, padding id 0."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(8, VOCAB, (3, 13))
    mask = np.zeros((3, 13), np.int32)
    for row, n in enumerate((13, 9, 4)):
        mask[row, :n] = 1
        ids[row, [p for p in (2, 5, n - 1) if p < n]] = STEP
    ids[mask == 0] = 0
    return ids, mask


def torch_rewards(model, ids, mask, step_token_id):
    """Step rewards from the transformers model's logits, computed here (not by its helper)."""
    with torch.no_grad():
        logits = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    probs = torch.softmax(logits.float(), -1)[..., 1].numpy()
    return [probs[b][(ids[b] == step_token_id) & (mask[b] == 1)].tolist() for b in range(ids.shape[0])]


def assert_rewards_close(a, b):
    assert [len(r) for r in a] == [len(r) for r in b]
    np.testing.assert_allclose(np.concatenate(a), np.concatenate(b), rtol=0, atol=TOL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_transformers_auto_classes_load_the_export_as_the_prm(tmp_path, name):
    cfg = Qwen2Config.preset("tiny", vocab_size=VOCAB, rope_theta=10_000.0, **SMALL[name])
    prm = random_ours(Qwen2PRM, cfg, seed=len(name))
    ids, mask = ragged_steps(len(name))
    ours = step_rewards(run(prm, ids, mask)[0], ids, STEP)
    assert len({round(x, 3) for r in ours for x in r}) > 3  # the rewards differ: a meaningful comparison
    out = save_hf(prm, tmp_path / "export", step_token_id=STEP)
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["auto_map"] == {"AutoModel": "modeling_prm_jax.Qwen2ForProcessRewardModel",
                                    "AutoModelForTokenClassification": "modeling_prm_jax.Qwen2ForProcessRewardModel"}
    assert cfg_json["step_token_id"] == STEP
    assert (out / "modeling_prm_jax.py").read_bytes() == \
        (Path(hf_mod.__file__).parent / "modeling_prm_jax.py").read_bytes()
    weights = torch_load_file(out / "model.safetensors")
    for auto in (AutoModel, AutoModelForTokenClassification):
        m = auto.from_pretrained(out, trust_remote_code=True).eval()
        assert type(m).__name__ == "Qwen2ForProcessRewardModel" and m.dtype == torch.float32
        assert m.config.tie_word_embeddings == cfg.tie_word_embeddings
        sd = m.state_dict()
        assert sorted(sd) == sorted(weights)  # score.0 / score.2 and a plain Qwen2 backbone, nothing else
        for k in ("score.0.weight", "score.2.bias", "model.embed_tokens.weight"):
            assert torch.equal(sd[k], weights[k]), k
        assert_rewards_close(torch_rewards(m, ids, mask, STEP), ours)
        # the class's own helper reads the step token id from config.json and skips padding
        assert_rewards_close(m.step_rewards(torch.tensor(ids), torch.tensor(mask)), ours)


def test_causal_export_has_no_prm_code(tmp_path):
    out = tmp_path / "e"
    save_hf(random_ours(Qwen2PRM, Qwen2Config.preset("tiny", vocab_size=VOCAB), seed=0), out)
    save_hf(random_ours(Qwen2ForCausalLM, Qwen2Config.preset("tiny", vocab_size=VOCAB), seed=0), out)  # same directory
    assert not (out / "modeling_prm_jax.py").exists()
    assert "auto_map" not in json.loads((out / "config.json").read_text())


# -- the Qwen2.5 step-token layout ------------------------------------------------------------

def qwen_config(**kw) -> Qwen2Config:
    return Qwen2Config(**{**dict(vocab_size=QWEN_VOCAB, hidden_size=16, intermediate_size=32, num_layers=1,
                                 num_heads=2, num_kv_heads=1, rope_theta=10_000.0), **kw})


def added_tokens(directory) -> tuple[dict[int, str], dict[int, str]]:
    """id -> content of the added tokens in tokenizer.json and in tokenizer_config.json."""
    tok = json.loads((Path(directory) / "tokenizer.json").read_text())
    cfg = json.loads((Path(directory) / "tokenizer_config.json").read_text())
    return ({e["id"]: e["content"] for e in tok["added_tokens"]},
            {int(i): e["content"] for i, e in cfg.get("added_tokens_decoder", {}).items()})


def test_qwen25_tokenizer_gets_extra_0_at_151651(qwen25_tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(qwen25_tokenizer_dir)
    n = len(tok)
    assert tok.convert_tokens_to_ids("<|quad_end|>") == OFFICIAL and "<extra_0>" not in tok.get_vocab()
    assert resolve_step_token(tok, "<extra_0>") == OFFICIAL
    assert len(tok) == n  # renamed, not appended as 151665
    assert tok.convert_tokens_to_ids("<extra_0>") == OFFICIAL and "<|quad_end|>" not in tok.get_vocab()
    assert tok.encode("3<extra_0>4", add_special_tokens=False) == [tok.encode("3")[0], OFFICIAL, tok.encode("4")[0]]
    assert tok.decode([OFFICIAL], skip_special_tokens=True) == ""  # still special
    assert resolve_step_token(tok, "<extra_0>") == OFFICIAL  # idempotent
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).convert_tokens_to_ids("<extra_0>") == OFFICIAL


def test_other_tokenizers_still_get_the_step_token_appended(toy_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(toy_tokenizer_dir)
    n = len(tok)
    assert resolve_step_token(tok, "<step>") == n and len(tok) == n + 1
    assert resolve_step_token(tok, "<extra_0>") == AutoTokenizer.from_pretrained(
        toy_tokenizer_dir).convert_tokens_to_ids("<extra_0>")


@pytest.fixture(scope="module")
def qwen_prm():
    return random_ours(Qwen2PRM, qwen_config(), seed=5)


ITEMS = [("What is 3 + 12?", ["3 + 12 = 15", "The answer is \\boxed{15}."]),
         ("Tom has 3 apples and buys 12 more.", ["15 * 4 = 60", "60 - 7 = 53", "The answer is \\boxed{53}."])]


def transformers_scores(model_dir, tokenizer, items):
    """Step rewards from transformers (AutoModel + our modeling file), inputs encoded like the model card."""
    m = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    out = []
    for problem, steps in items:
        ids = np.asarray([encode_prm(tokenizer, problem, steps, OFFICIAL)])
        out.extend(torch_rewards(m, ids, np.ones_like(ids), OFFICIAL))
    return out


def test_qwen25_prm_export_reload_and_score(qwen25_tokenizer_dir, qwen_prm, tmp_path):
    """A stock Qwen2.5 tokenizer directory given to save_hf: the export's tokenizer files name 151651
    `<extra_0>`, config.json says 151651, load_prm accepts it and scores like transformers."""
    out = save_hf(qwen_prm, tmp_path / "export", tokenizer_dir=qwen25_tokenizer_dir)
    assert json.loads((out / "config.json").read_text())["step_token_id"] == OFFICIAL
    in_json, in_cfg = added_tokens(out)
    assert in_json[OFFICIAL] == "<extra_0>" and in_cfg[OFFICIAL] == "<extra_0>"
    assert len(in_json) == 22 and in_json[151650] == "<|quad_start|>" and in_json[151652] == "<|vision_start|>"
    assert added_tokens(qwen25_tokenizer_dir)[0][OFFICIAL] == "<|quad_end|>"  # the source is left alone
    tok = hf_mod.load_tokenizer(out)
    assert tok.convert_tokens_to_ids("<extra_0>") == OFFICIAL and len(tok) == 151_665
    reloaded = load_prm(out)
    ours = score_steps(reloaded, tok, ITEMS, batch_size=2, max_length=256)
    assert [len(s) for s in ours] == [2, 3]
    assert_rewards_close(ours, transformers_scores(out, tok, ITEMS))


def test_official_checkpoint_reexport_gets_our_modeling_file(qwen25_tokenizer_dir, qwen_prm, tmp_path):
    """A checkpoint laid out like the released Qwen2.5-Math-PRM (its own remote-code auto_map, no step_token_id,
    tokenizer with <extra_0> at 151651) -> load_prm -> save_hf: our modeling file and auto_map, 151651."""
    official = save_hf(qwen_prm, tmp_path / "official", tokenizer_dir=qwen25_tokenizer_dir)
    cfg = json.loads((official / "config.json").read_text())
    del cfg["step_token_id"], cfg["step_token"]
    cfg["auto_map"] = {"AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel",
                       "AutoConfig": "configuration_qwen2_rm.Qwen2RMConfig"}
    (official / "config.json").write_text(json.dumps(cfg))
    (official / "modeling_prm_jax.py").unlink()
    out = save_hf(load_prm(official), tmp_path / "again", tokenizer_dir=official)
    cfg2 = json.loads((out / "config.json").read_text())
    assert cfg2["auto_map"]["AutoModel"] == "modeling_prm_jax.Qwen2ForProcessRewardModel"
    assert cfg2["step_token_id"] == OFFICIAL and cfg2["step_token"] == "<extra_0>"
    assert (out / "modeling_prm_jax.py").read_bytes() == \
        (Path(hf_mod.__file__).parent / "modeling_prm_jax.py").read_bytes()
    tok = hf_mod.load_tokenizer(out)
    assert_rewards_close(transformers_scores(out, tok, ITEMS[:1]),
                         score_steps(qwen_prm, tok, ITEMS[:1], batch_size=1, max_length=256))


# -- refusals ---------------------------------------------------------------------------------

def test_config_and_tokenizer_disagreeing_on_the_step_token_is_refused(tmp_path, toy_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(toy_tokenizer_dir)
    extra = tok.convert_tokens_to_ids("<extra_0>")
    out = save_hf(random_ours(Qwen2PRM, Qwen2Config.preset("tiny", vocab_size=len(tok)), seed=0), tmp_path / "e",
                  tokenizer_dir=toy_tokenizer_dir)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["step_token_id"] == extra and cfg["step_token"] == "<extra_0>"
    load_prm(out)  # agreeing: loads
    cfg["step_token_id"] = extra - 1
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"config\.json: step_token_id is {extra - 1}, but the tokenizer "
                                              rf"maps '<extra_0>' to {extra}"):
        load_prm(out)


def test_official_vocabulary_without_extra_0_at_151651_is_refused(tmp_path, qwen25_tokenizer_dir, qwen_prm):
    """A PRM in Qwen2.5's vocabulary whose tokenizer still says <|quad_end|> (no <extra_0>) is refused even
    without a step_token_id in config.json (the released model's config has none)."""
    out = save_hf(qwen_prm, tmp_path / "e", tokenizer_dir=qwen25_tokenizer_dir)
    cfg = json.loads((out / "config.json").read_text())
    del cfg["step_token_id"], cfg["step_token"]
    (out / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(qwen25_tokenizer_dir) / f, out / f)
    with pytest.raises(CheckpointError, match=r"maps '<extra_0>' to None, but a PRM in the official Qwen2\.5 "
                                              r"vocabulary scores at 151651"):
        load_prm(out)


def test_step_token_id_outside_the_vocabulary_is_refused_at_export(tmp_path, toy_tokenizer_dir):
    prm = random_ours(Qwen2PRM, Qwen2Config.preset("tiny", vocab_size=VOCAB), seed=0)
    with pytest.raises(CheckpointError, match=r"step token id 100000 is outside the tokenizer's vocabulary"):
        save_hf(prm, tmp_path / "e", tokenizer_dir=toy_tokenizer_dir, step_token_id=100_000)



def test_train_two_steps_from_a_qwen25_init_then_export_reload_score(tmp_path, qwen25_tokenizer_dir):
    """The whole path: a Qwen2.5-vocabulary policy (stock tokenizer) -> prm_jax.training, 2 steps -> the run's
    own export -> load_prm and transformers agree, at <extra_0> = 151651."""
    from test_trainer import TINY_RECIPE, toy_records, write

    from prm_jax.training import trainer
    from prm_jax.training.config import apply_overrides, load_config

    init = save_hf(random_ours(Qwen2ForCausalLM, qwen_config(), seed=6), tmp_path / "init",
                   tokenizer_dir=qwen25_tokenizer_dir)
    assert added_tokens(init)[0][OFFICIAL] == "<|quad_end|>"  # a policy export keeps the stock tokenizer
    cfg = apply_overrides(load_config(TINY_RECIPE), ["steps=2", "warmup_steps=0", "log_every=1", "eval_every=0",
                                                     "save_every=2", "max_length=64", "buckets=[64]",
                                                     "batch_size=4"])
    out = tmp_path / "run"
    summary = trainer.train(cfg, write(tmp_path / "t.jsonl", toy_records(8, 0)), str(out), init_dir=str(init),
                            devices=jax.devices()[:1], progress=False)
    assert summary["status"] == "completed"
    assert AutoTokenizer.from_pretrained(out / "tokenizer").convert_tokens_to_ids("<extra_0>") == OFFICIAL
    export = out / "hf"
    assert json.loads((export / "config.json").read_text())["step_token_id"] == OFFICIAL
    in_json, in_cfg = added_tokens(export)
    assert in_json[OFFICIAL] == "<extra_0>" and in_cfg[OFFICIAL] == "<extra_0>" and max(in_json) == 151_664
    tok = hf_mod.load_tokenizer(export)
    ours = score_steps(load_prm(export), tok, ITEMS, batch_size=2, max_length=256)
    assert [len(s) for s in ours] == [2, 3]
    assert_rewards_close(ours, transformers_scores(export, tok, ITEMS))
