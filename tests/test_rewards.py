"""prm_jax.rewards: the PRM as a reward in Tunix GRPO's `reward_fns` signature.

References: the offline scorer (`PRMScorer.score`, checked against transformers in test_eval_run)
on hand-split steps, aggregated by hand; the pure helpers against hand-written cases. Tunix calls a
reward function as `reward_fn(prompts=..., completions=..., **other batch fields)` (0.1.5:
RLLearner._compute_rewards, which adds `mode`; 0.1.7: tunix/rl/reward_manager.py, after reading its
signature); the call here does the same. A real GRPOLearner step consuming it: test_tunix_grpo.py.
"""
import inspect
import math

import numpy as np
import pytest

from conftest import spread_tiny_prm
from prm_jax.errors import InputError
from prm_jax.evaluation.scoring import PRMScorer
from prm_jax.rewards import agg_name, problem_of_prompt, process_reward, step_splitter, strip_special_tail

MAX_LEN = 256
BUCKETS = (128, 256)
PROBLEMS = ["Tom has 3 apples and buys 12 more. How many apples does he have?", "What is 15 * 4 - 7?", "Half of 56?"]
COMPLETIONS = ["3 + 12 = 15\n\nThe answer is \\boxed{15}.", "15 * 4 = 60\n\n60 - 7 = 53\n  \n\nSo 53.<|im_end|>",
               "56 / 2 = 28"]
STEPS = [["3 + 12 = 15", "The answer is \\boxed{15}."], ["15 * 4 = 60", "60 - 7 = 53", "So 53."], ["56 / 2 = 28"]]


@pytest.fixture(scope="module")
def tiny_prm(toy_tokenizer):
    return spread_tiny_prm(len(toy_tokenizer), seed=1)


@pytest.fixture(scope="module")
def ref_scores(tiny_prm, toy_tokenizer, mesh):
    return PRMScorer(tiny_prm, toy_tokenizer, batch_size=8, max_length=MAX_LEN, buckets=BUCKETS,
                     mesh=mesh).score(list(zip(PROBLEMS, STEPS)))


def chatml(tok, problem):
    return tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": problem}],
                                   tokenize=False, add_generation_prompt=True)


def test_helpers_by_hand():
    assert step_splitter()("a\n\n b \n \n\nc\r\n\r\nd\n") == ["a", "b", "c", "d"]
    assert step_splitter("newline")("a\nb\n\n c") == ["a", "b", "c"]
    assert step_splitter(" ки")("x ки y ки ") == ["x", "y"]
    with pytest.raises(InputError, match="step split"):
        step_splitter("")
    assert problem_of_prompt("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
                             "<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\n What is 2+2?\n<|im_end|>\n"
                             "<|im_start|>assistant\n") == "What is 2+2?"
    assert problem_of_prompt("  plain problem ") == "plain problem"
    assert strip_special_tail("x\n\ny <|im_end|><|endoftext|>\n", ["<|im_end|>", "<|endoftext|>"]) == "x\n\ny"
    assert agg_name("prod") == "product" and agg_name("min") == "min"
    with pytest.raises(InputError, match="agg 'max'"):
        agg_name("max")


def test_process_reward_in_tunix_signature_equals_offline_scores(tiny_prm, toy_tokenizer, mesh, ref_scores):
    prompts = [chatml(toy_tokenizer, p) for p in PROBLEMS]
    fns = {agg: process_reward(tiny_prm, toy_tokenizer, agg, mesh=mesh, batch_size=8, max_length=MAX_LEN,
                               buckets=BUCKETS) for agg in ("min", "last", "prod")}
    # Tunix passes every parameter but prompts/completions/kwargs from its algo config: there are none
    assert set(inspect.signature(fns["min"]).parameters) == {"prompts", "completions", "kwargs"}
    assert fns["min"].__name__ == "prm_process_reward"  # Tunix logs rewards under the function's name
    want = {"min": [min(s) for s in ref_scores], "last": [s[-1] for s in ref_scores],
            "prod": [math.prod(s) for s in ref_scores]}
    for agg, fn in fns.items():
        got = fn(prompts=prompts, completions=COMPLETIONS, answer=["15", "53", "28"])
        assert isinstance(got, list) and all(isinstance(x, float) for x in got)
        np.testing.assert_allclose(got, want[agg], atol=1e-5)
    assert np.ptp(want["min"]) > 0.05


def test_problem_key_empty_and_too_long_completions(tiny_prm, toy_tokenizer, mesh, ref_scores):
    fn = process_reward(tiny_prm, toy_tokenizer, "min", problem_key="question", empty_reward=-1.0, mesh=mesh,
                        batch_size=8, max_length=MAX_LEN, buckets=BUCKETS)
    got = fn(prompts=["<policy prompt>"] * 3, completions=[COMPLETIONS[0], " \n\n ", COMPLETIONS[2]],
             question=[PROBLEMS[0], PROBLEMS[1], PROBLEMS[2]])
    np.testing.assert_allclose(got, [min(ref_scores[0]), -1.0, min(ref_scores[2])], atol=1e-5)
    with pytest.raises(InputError, match="question: no such keyword"):
        fn(prompts=["p"], completions=["a"])
    with pytest.raises(InputError, match=r"completions\[1\].*max_length=256"):
        fn(prompts=["p", "p"], completions=["a", "\n\n".join(["3 + 12 = 15"] * 60)], question=["q", "q"])
    with pytest.raises(InputError, match="prompts: 1 prompts for 2 completions"):
        fn(prompts=["p"], completions=["a", "b"], question=["q", "q"])
