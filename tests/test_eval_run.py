"""End-to-end evaluation runs with a tiny random PRM saved in Hugging Face layout.

Independent references: every step score is recomputed by transformers (torch Qwen2Model + the
two-layer score head, loaded from the same safetensors) on each sample alone, unpadded and
unbatched; ProcessBench F1 and Best-of-N accuracies are recomputed from the written files with
plain loops that restate the official definitions.
"""
import glob
import json
import math

import numpy as np
import pytest
from flax import nnx

from prm_jax import cli
from prm_jax.data.prm_format import encode_prm
from prm_jax.evaluation.scoring import PRMScorer
from prm_jax.models.prm import Qwen2PRM
from prm_jax.models.qwen2 import Qwen2Config
from prm_jax.parallel.mesh import make_mesh

torch = pytest.importorskip("torch")
MAX_LEN = 256


@pytest.fixture(scope="module")
def tiny_prm(toy_tokenizer):
    prm = Qwen2PRM(Qwen2Config.preset("tiny", vocab_size=len(toy_tokenizer)), nnx.Rngs(0))
    # A random head puts every score at 0.50 +- 0.001; spread them so thresholds matter.
    k = prm.score.dense_out.kernel
    k.set_value(k.get_value() * 400.0)
    return prm


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory, tiny_prm, toy_tokenizer_dir):
    from prm_jax.models.hf import save_hf

    out = tmp_path_factory.mktemp("tiny_prm")
    save_hf(tiny_prm, out, tokenizer_dir=toy_tokenizer_dir)
    return str(out)


@pytest.fixture(scope="module")
def torch_scores(prm_dir, toy_tokenizer):
    """(problem, steps, max_length) -> step scores, by transformers on one unpadded sample."""
    from safetensors.torch import load_file
    from transformers import Qwen2Config as HFConfig, Qwen2Model

    cfg = HFConfig.from_pretrained(prm_dir)
    model = Qwen2Model.from_pretrained(prm_dir, config=cfg, dtype=torch.float32).eval()
    weights = {k: v for f in glob.glob(f"{prm_dir}/*.safetensors") for k, v in load_file(f).items()}
    head = torch.nn.Sequential(torch.nn.Linear(cfg.hidden_size, cfg.hidden_size), torch.nn.ReLU(),
                               torch.nn.Linear(cfg.hidden_size, 2))
    head.load_state_dict({k[len("score."):]: v for k, v in weights.items() if k.startswith("score.")})
    step_id = toy_tokenizer.convert_tokens_to_ids("<extra_0>")

    def score(problem, steps, max_length=MAX_LEN, **prompt):
        ids = encode_prm(toy_tokenizer, problem, list(steps), step_id, **prompt)[:max_length]
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state
            probs = torch.softmax(head(hidden).float(), -1)[0, :, 1]
        return probs[torch.tensor(ids) == step_id].tolist()

    return score


def test_scorer_batches_buckets_and_truncation_match_unbatched_reference(tiny_prm, toy_tokenizer, torch_scores):
    long_problem = "Tom has 3 apples and buys 12 more. How many apples does he have? " * 4
    items = [
        ("Tom has 3 apples.", ["3 + 12 = 15", "15 * 4 = 60", "60 - 7 = 53", "The answer is \\boxed{53}."]),
        ("x", ["a"]),  # one step
        (long_problem, ["3 + 12 = 15"]),  # prompt alone exceeds max_length: no step token left
        ("Tom buys 12 more.", ["Step 1: 7 * 8 = 56. " * 3, "Step 2: 56 / 2 = 28. " * 4, "So 28."]),  # partly cut
        ("How many?", []),  # no steps at all
        ("Tom has 3 apples.", ["15 * 4 = 60"]),
        ("What is 3 + 12?", ["3 + 12 = 15", "The answer is \\boxed{15}."]),
    ]
    mesh = make_mesh("data=2,fsdp=1,tensor=4")
    scorer = PRMScorer(tiny_prm, toy_tokenizer, batch_size=3, max_length=160, buckets=(96, 160), mesh=mesh,
                       tokens_per_batch=400)
    assert scorer.batch_size == 4  # rounded up to the 2 data shards
    assert (scorer.rows_for(160), scorer.rows_for(96)) == (2, 4)
    got = scorer.score(items)
    assert got[2] == [] and got[4] == []
    assert 0 < len(got[3]) < 3  # truncation kept a prefix of the steps
    for (problem, steps), scores in zip(items, got):
        ref = torch_scores(problem, steps, 160)
        assert len(scores) == len(ref)
        np.testing.assert_allclose(scores, ref, atol=2e-5)
    assert scorer.shapes_used <= {(2, 160), (2, 96), (4, 96)}  # buckets x row ladder: bounded


def _rows(path):
    return [json.loads(line) for line in open(path)]


def _official_f1(rows, threshold):
    """ProcessBench's definition, restated: pred = first step scored below the threshold, else -1."""
    out = {}
    for subset in sorted({r["subset"] for r in rows}):
        sub = [r for r in rows if r["subset"] == subset]
        preds = [next((i for i, s in enumerate(r["step_scores"]) if s < threshold), -1) for r in sub]
        err = [p == r["label"] for p, r in zip(preds, sub) if r["label"] != -1]
        cor = [p == -1 for p, r in zip(preds, sub) if r["label"] == -1]
        a, b = sum(err) / len(err), sum(cor) / len(cor)
        out[subset] = (a, b, 0.0 if a + b == 0 else 2 * a * b / (a + b), preds)
    return out


def load_tok(path):
    from prm_jax.models.hf import load_tokenizer

    return load_tokenizer(path)


def test_processbench_cli_end_to_end(shared_data, prm_dir, torch_scores, tmp_path, capsys):
    data = str(shared_data / "processbench")
    out = tmp_path / "pb"
    # f32 for parity with transformers (auto scores in bf16 on CPUs with AMX)
    argv = ["eval", "processbench", "--prm", prm_dir, "--data", data, "--out", str(out), "--limit", "4",
            "--max-length", str(MAX_LEN), "--batch-size", "4", "--mesh", "data=2,fsdp=2,tensor=2", "--scoring-dtype",
            "float32"]
    assert cli.main(argv + ["--threshold", "0.5"]) == 0
    assert "average F1" in capsys.readouterr().out
    rows = _rows(out / "predictions.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert len(rows) == 16 and {r["subset"] for r in rows} == {"gsm8k", "math", "olympiadbench", "omnimath"}
    for name in ("f1_per_subset.png", "min_position.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"

    # step scores == transformers on each sample alone
    samples = {f"{name}/{r['id']}": r for name in summary["subsets"]
               for r in json.load(open(f"{data}/{name}.json"))}
    tok = load_tok(prm_dir)
    sid, tokens = tok.convert_tokens_to_ids("<extra_0>"), 0
    for row in rows:
        s = samples[f"{row['subset']}/{row['id']}"]
        assert row["label"] == s["label"]
        np.testing.assert_allclose(row["step_scores"], torch_scores(s["problem"], s["steps"]), atol=2e-5)
        ids = encode_prm(tok, s["problem"], s["steps"], sid)[:MAX_LEN]
        tokens += len(ids) - ids[::-1].index(sid) if sid in ids else 0  # up to the last step token kept
    # the run's summary reports what it computed (auto dtype on CPU: f32, as the scores above show)
    scoring = summary["scoring"]
    assert scoring["real_tokens"] == tokens and scoring["scored"] == sum(bool(r["step_scores"]) for r in rows)
    assert scoring["padding_share"] == pytest.approx(1 - tokens / scoring["positions"])

    # metrics recomputed from the predictions
    ref = _official_f1(rows, 0.5)
    assert summary["threshold"] == 0.5
    for subset, (a, b, f1, preds) in ref.items():
        assert [r["pred"] for r in rows if r["subset"] == subset] == preds
        got = summary["subsets"][subset]
        assert (got["acc_error"], got["acc_correct"], got["n_error"], got["n_correct"]) == (a, b, 2, 2)
        assert got["f1"] == pytest.approx(f1)
    assert summary["average_f1"] == pytest.approx(np.mean([v[2] for v in ref.values()]))

    # rerun on the same OUT with a tuned threshold: nothing is rescored, predictions are rewritten
    assert cli.main(argv + ["--threshold", "tune"]) == 0
    assert "resuming: 16 of 16 samples already scored" in capsys.readouterr().out
    rows2 = _rows(out / "predictions.jsonl")
    summary2 = json.loads((out / "summary.json").read_text())
    t = summary2["threshold"]
    assert [r["step_scores"] for r in rows2] == [r["step_scores"] for r in rows]
    ref2 = _official_f1(rows2, t)
    for subset, (_, _, f1, preds) in ref2.items():
        assert [r["pred"] for r in rows2 if r["subset"] == subset] == preds
        assert summary2["subsets"][subset]["f1"] == pytest.approx(f1)
    best_grid = max(_official_f1([r for r in rows2 if r["subset"] == "gsm8k"], g)["gsm8k"][2]
                    for g in np.linspace(0, 1, 401))
    assert summary2["subsets"]["gsm8k"]["f1"] >= best_grid - 1e-12
    assert (summary2["threshold_mode"], summary2["tune_subset"]) == ("tuned on gsm8k", "gsm8k")

    # --tune-on picks the threshold on another subset (the demo tunes on its dev set)
    assert cli.main(argv + ["--threshold", "tune", "--tune-on", "math"]) == 0
    summary3 = json.loads((out / "summary.json").read_text())
    assert summary3["threshold_mode"] == "tuned on math"
    best_math = max(_official_f1([r for r in rows2 if r["subset"] == "math"], g)["math"][2]
                    for g in np.linspace(0, 1, 401))
    assert summary3["subsets"]["math"]["f1"] == pytest.approx(summary3["tuned_f1"])
    assert summary3["tuned_f1"] >= best_math - 1e-12
    ref3 = _official_f1(rows2, summary3["threshold"])
    assert summary3["subsets"]["gsm8k"]["f1"] == pytest.approx(ref3["gsm8k"][2])
    with pytest.raises(ValueError, match="picks the threshold on dev; add it to --subsets"):
        cli.run(argv + ["--threshold", "tune", "--tune-on", "dev"])

    # resuming into this OUT with other settings would mix scores: refused
    changed = [a if a != str(MAX_LEN) else "200" for a in argv]
    with pytest.raises(ValueError, match=r"scoring.json: .* different PRM or settings \(differs in: max_length\)"):
        cli.run(changed)

    # the paper's diagnostic, recomputed
    flawed = [r for r in rows2 if r["final_answer_correct"] and r["label"] >= 0]
    d = summary2["diagnostics"]["flawed_with_correct_answer"]
    assert d["n"] == len(flawed)
    if flawed:
        assert d["found_exact"] == pytest.approx(np.mean([r["pred"] == r["label"] for r in flawed]))
        assert d["flagged_any"] == pytest.approx(np.mean([r["pred"] >= 0 for r in flawed]))


def test_bon_cli_end_to_end(prm_dir, torch_scores, tmp_path, capsys):
    problems = [("Tom has 3 apples and buys 12 more. How many apples does he have?", "15"),
                ("What is 15 * 4 - 7?", "53"), ("Half of 56?", "28")]
    bodies = [["3 + 12 = 15", "The answer is \\boxed{15}."], ["15 * 4 = 60", "60 - 7 = 53"],
              ["Step 1: 7 * 8 = 56.", "56 / 2 = 28", "So the total is 28 dollars."], ["3 + 12 = 15"]]
    finals = [["15", "16", "16", None], ["53", "50", "53", "53"], ["27", "28", "27", "\\frac{56}{2}"]]
    records = []
    for p, (problem, gold) in enumerate(problems):
        for k in range(4):
            records.append({"id": f"q{p}-{k}", "problem": problem, "answer": gold,
                            "steps": bodies[(p + k) % 4], "final_answer": finals[p][k], "generator": "toy"})
    # shuffled file order: grouping and the k order come from the ids
    order = [5, 0, 11, 3, 8, 1, 10, 2, 7, 4, 9, 6]
    resp = tmp_path / "responses.jsonl"
    resp.write_text("".join(json.dumps(records[i]) + "\n" for i in order))
    out = tmp_path / "bon"
    assert cli.main(["eval", "bon", "--prm", prm_dir, "--responses", str(resp), "--out", str(out),
                     "--max-length", str(MAX_LEN), "--batch-size", "4", "--agg", "min", "--scoring-dtype", "float32"]) == 0
    assert "prm@N" in capsys.readouterr().out
    scores = {r["id"]: r["step_scores"] for r in _rows(out / "scores.jsonl")}
    for r in records:
        np.testing.assert_allclose(scores[r["id"]], torch_scores(r["problem"], r["steps"]), atol=2e-5)
    summary = json.loads((out / "bon_summary.json").read_text())
    assert (out / "bon_curve.png").exists() and (out / "min_position.png").exists()

    gold_ok = {"15": {"15"}, "53": {"53"}, "28": {"28", "\\frac{56}{2}"}}  # hand-graded
    curve = []
    for n in (1, 2, 4):
        prm = maj = pas = 0
        for p, (_, gold) in enumerate(problems):
            recs = records[4 * p: 4 * p + n]
            ok = [r["final_answer"] in gold_ok[gold] for r in recs]
            agg = [min(scores[r["id"]]) for r in recs]
            prm += ok[agg.index(max(agg))]
            votes = ["gold" if o else r["final_answer"] for o, r in zip(ok, recs) if r["final_answer"] is not None]
            top = max(votes.count(v) for v in votes)
            maj += next(v for v in votes if votes.count(v) == top) == "gold"
            pas += any(ok)
        curve.append({"n": n, "prm": prm / 3, "maj": maj / 3, "pass": pas / 3})
    assert summary["curve"] == curve
    assert summary["max_n"] == 4 and summary["n_problems"] == 3
    last = [min(range(len(s)), key=lambda i: (s[i], i)) == len(s) - 1 for s in scores.values()]
    assert summary["min_score_at_last_step"]["share"] == pytest.approx(np.mean(last))
    assert math.isclose(summary["response_accuracy"], 6 / 12)


def test_eval_uses_the_system_prompt_it_is_given(prm_dir, torch_scores, tmp_path):
    records = [{"id": f"q{k}", "problem": "What is 15 * 4 - 7?", "answer": "53", "steps": ["15 * 4 = 60", s],
                "final_answer": "53", "generator": "toy"} for k, s in enumerate(["60 - 7 = 53", "60 - 7 = 50"])]
    resp = tmp_path / "responses.jsonl"
    resp.write_text("".join(json.dumps(r) + "\n" for r in records))
    for flag, prompt in (("", None), ("Think.", "Think.")):
        out = tmp_path / f"bon{len(flag)}"
        assert cli.main(["eval", "bon", "--prm", prm_dir, "--responses", str(resp), "--out", str(out),
                         "--max-length", str(MAX_LEN), "--system-prompt", flag, "--no-plots",
                         "--scoring-dtype", "float32"]) == 0
        scores = {r["id"]: r["step_scores"] for r in _rows(out / "scores.jsonl")}
        for r in records:
            ref = torch_scores(r["problem"], r["steps"], system_prompt=prompt)
            np.testing.assert_allclose(scores[r["id"]], ref, atol=2e-5)
            assert not np.allclose(ref, torch_scores(r["problem"], r["steps"]), atol=1e-4)


@pytest.mark.parametrize("t", [300, 2200])
def test_blocked_causal_attention_equals_full_attention(t):
    """The scorer's long inputs go through attention.causal_attention (query blocks skip future keys);
    it must equal plain masked attention, here with right padding and 3 (t=300) or 17 (t=2200)
    uneven blocks."""
    import jax.numpy as jnp

    from prm_jax.models.attention import attention, causal_attention
    from prm_jax.models.qwen2 import full_mask

    rng = np.random.default_rng(0)
    b, h, kv, d = 2, 4, 2, 8
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, kv, t, d)), jnp.float32) for _ in range(2))  # kv-head-major
    pad = jnp.asarray(np.arange(t)[None] < np.array([[t], [170]]), jnp.int32)
    mask = full_mask(pad, None, b, t)
    import jax

    np.testing.assert_allclose(jax.jit(causal_attention)(q, k, v, mask), jax.jit(attention)(q, k, v, mask),
                               atol=1e-6)
