"""PRMScorer batching, padding report and bf16 mode, on a tiny random PRM.

References: each item scored alone (batch size 1); plans and padding shares counted by hand; the
f32 scores for the bf16 mode. (The scorer itself is checked against transformers in test_eval_run.)
"""
import numpy as np
import pytest
from flax import nnx

from prm_jax.buckets import pick_bucket
from prm_jax.data.prm_format import encode_prm
from prm_jax.evaluation.batching import BatchRules, plan_batches
from prm_jax.evaluation.scoring import PRMScorer, group_rows
from prm_jax.models.prm import Qwen2PRM
from prm_jax.models.qwen2 import Qwen2Config

STEPS = ["3 + 12 = 15", "15 * 4 = 60", "60 - 7 = 53", "The answer is \\boxed{53}.",
         "Step 1: 7 * 8 = 56. ", "Step 2: 56 / 2 = 28. ", "So the total is 28 dollars."]


def ragged_items(n: int = 14) -> list[tuple[str, list[str]]]:
    """Solutions of 1 to 14 steps, some repeated steps: lengths from ~40 to ~200 tokens."""
    rng = np.random.default_rng(0)
    return [("Tom has 3 apples and buys 12 more. How many apples does he have?" * (1 + i % 2),
             [STEPS[j] * (1 + (i + j) % 3) for j in rng.integers(0, len(STEPS), 1 + i % 7 + i // 3)])
            for i in range(n)]


@pytest.fixture(scope="module")
def tiny_prm(toy_tokenizer):
    prm = Qwen2PRM(Qwen2Config.preset("tiny", vocab_size=len(toy_tokenizer)), nnx.Rngs(1))
    k = prm.score.dense_out.kernel  # spread the scores (a random head puts them all at 0.50)
    k.set_value(k.get_value() * 400.0)
    return prm


def test_plan_counted_by_hand():
    # bucket 128 holds 2 rows (budget 256), bucket 64 holds 4 (ladder 1, 2, 4)
    rules = BatchRules(buckets=(64, 128), max_rows=8, tokens_per_batch=256, overhead=128)
    assert (rules.rows_for(128), rules.rows_for(64)) == (2, 4)
    lengths = [30, 100, 40, 90, 30]
    plan = plan_batches(lengths, rules)
    # [100, 90] at 2 x 128; [40, 30, 30] at 4 x 64 (one filler row) costs 256 + 128 against
    # 2 x 64 + 1 x 64 + 2 * 128 = 448 for splitting it
    assert [(b.items, b.rows, b.length) for b in plan] == [((1, 3), 2, 128), ((2, 0, 4), 4, 64)]
    assert {(b.rows, b.length) for b in plan} <= rules.shapes()
    # with a negligible per-batch charge the split wins: 2 x 64 + 1 x 64 < 4 x 64
    plan1 = plan_batches(lengths, BatchRules((64, 128), 8, 256, overhead=1))
    assert sorted((b.rows, b.length) for b in plan1) == [(1, 64), (2, 64), (2, 128)]
    assert sorted(i for b in plan1 for i in b.items) == [0, 1, 2, 3, 4]


BUCKETS = (192, 256, 320, 384)


@pytest.mark.parametrize("group_tokens", [None, 256])
def test_token_budget_batching_equals_batch_size_one(tiny_prm, toy_tokenizer, group_tokens):
    """group_tokens None: the CPU default (GROUP_TOKENS), which holds this test's batches whole; 256: each
    forward runs its rows one at a time (scoring.group_rows)."""
    items = ragged_items(12) + [("x", ["1"] * 70)]  # the last has more steps than a forward's step slots
    scorer = PRMScorer(tiny_prm, toy_tokenizer, batch_size=8, max_length=384, buckets=BUCKETS, tokens_per_batch=800,
                       group_tokens=group_tokens)
    lengths = [len(encode_prm(toy_tokenizer, p, s, scorer.step_token_id)) for p, s in items]
    assert len({pick_bucket(n, BUCKETS) for n in lengths}) == 4  # ~140 to 383 tokens
    calls = []
    forward = scorer._forward
    slotted = []
    scorer._forward = lambda ids, mask, slots: (calls.append(ids.shape) or slotted.append(slots is not None)
                                                or forward(ids, mask, slots))
    got = scorer.score(items)
    assert any(slotted) and not all(slotted)  # step slots, and the last layer everywhere for the 70 steps
    assert len(calls) > 1 and all(r * n <= 800 for r, n in calls)  # several forwards within the budget
    assert any(r > 1 for r, _ in calls) and set(calls) <= scorer.rules.shapes()
    assert any(group_rows(r, n, scorer.group_tokens) < r for r, n in calls) == bool(group_tokens)
    one = PRMScorer(tiny_prm, toy_tokenizer, batch_size=1, max_length=384, buckets=BUCKETS)
    ref = [one.score([it])[0] for it in items]  # each item alone, batch size 1
    assert [len(s) for s in got] == [len(s) for _, s in items] == [len(r) for r in ref]
    np.testing.assert_array_equal(np.concatenate(got), np.concatenate(ref))  # in input order, bit for bit
    # the padding share the run reports is the one counted from the forwards it ran
    computed = sum(r * n for r, n in calls)
    stats = scorer.last_stats
    assert (stats.real_tokens, stats.positions, stats.batches) == (sum(lengths), computed, len(calls))
    assert stats.padding_share == pytest.approx(1 - sum(lengths) / computed)
    # a second call compiles nothing new and gives the same scores
    before = set(scorer.shapes_used)
    assert scorer.score(items[::-1]) == got[::-1] and scorer.shapes_used == before
    assert scorer.last_stats.new_shapes == 0


def test_padding_share_counted_by_hand(tiny_prm, toy_tokenizer):
    """Three inputs of 18, 20 and 34 tokens; buckets 24 and 40, a budget of 96 positions: the
    34 goes alone at 1 x 40 (2 rows x 40 would waste 40 more), the 18 and 20 share 2 x 24."""
    items = [("x", ["a"]), ("x", ["a", "b"]), ("x", ["a"] * 9)]
    scorer = PRMScorer(tiny_prm, toy_tokenizer, batch_size=4, max_length=40, buckets=(24, 40), tokens_per_batch=96,
                       system_prompt=None)
    n = [len(encode_prm(toy_tokenizer, p, s, scorer.step_token_id, None)) for p, s in items]
    assert n == [18, 20, 34]
    scorer.score(items)
    assert scorer.last_stats.positions == 1 * 40 + 2 * 24
    assert scorer.last_stats.padding_share == pytest.approx(1 - 72 / 88)
    assert scorer.last_stats.as_dict()["padding_share"] == scorer.last_stats.padding_share


# On P(correct): bf16 keeps 8 mantissa bits through every matmul, and this tiny PRM's head (x 400) magnifies
# them. Measured 0.029 with attention weights rounded to bf16 after normalising, 0.031 before (the scorer's form).
BF16_ATOL = 0.04


def test_auto_scoring_dtype_is_bf16_on_accelerators_and_on_cpus_with_amx_or_the_bf16_kernel(monkeypatch):
    from prm_jax.evaluation import scoring
    from prm_jax.models import cpu_kernels

    for amx, kernel, cpu in ((True, False, "bfloat16"), (False, True, "bfloat16"), (False, False, "float32")):
        monkeypatch.setattr(scoring, "cpu_has_amx", lambda amx=amx: amx)
        monkeypatch.setattr(cpu_kernels, "available", lambda kernel=kernel: kernel)
        assert [scoring.default_scoring_dtype(p) for p in ("cpu", "gpu", "tpu")] == [cpu, "bfloat16", "bfloat16"]


def test_bf16_scores_close_to_f32_and_rank_alike(tiny_prm, toy_tokenizer):
    items = ragged_items(12)
    f32 = PRMScorer(tiny_prm, toy_tokenizer, batch_size=12, max_length=384, buckets=(384,))
    bf16 = PRMScorer(tiny_prm, toy_tokenizer, batch_size=12, max_length=384, buckets=(384,), compute_dtype="bfloat16")
    assert bf16.state["layers"][0]["mlp"]["up_proj"]["kernel"][...].dtype == np.dtype("bfloat16")
    a, b = f32.score(items), bf16.score(items)
    diff = max(abs(x - y) for s, t in zip(a, b) for x, y in zip(s, t))
    assert 0 < diff < BF16_ATOL, diff
    # Rank solutions by their weakest step (the paper's min aggregation), as Best-of-N would: every
    # pair whose f32 scores differ by more than the tolerance is ordered alike in bf16.
    agg32, agg16 = [min(s) for s in a], [min(s) for s in b]
    pairs = [(i, j) for i in range(len(items)) for j in range(len(items)) if agg32[i] > agg32[j] + BF16_ATOL]
    assert len(pairs) >= 30  # most of the 66 pairs are that far apart
    assert all(agg16[i] > agg16[j] for i, j in pairs)
    assert f32.fingerprint()["param_sumsq"] == pytest.approx(bf16.fingerprint()["param_sumsq"], rel=1e-6)
    assert bf16.fingerprint()["compute_dtype"] == "bfloat16"
