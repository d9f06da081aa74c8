"""Step splitting/joining and the policy-side prompt and rollout prefixes."""
import pytest

from prm_jax.data.prm_format import DEFAULT_SYSTEM_PROMPT
from prm_jax.data.steps import (join_steps, policy_prompt_ids, rollout_prefix_ids, rollout_prefix_text,
                                    split_steps)


def test_split_on_blank_lines():
    text = "  First, 3 + 12 = 15.\n\n15 * 4 = 60\nstill step two\n \n\n\t\nSo \\boxed{60}.\n\n"
    assert split_steps(text) == ["First, 3 + 12 = 15.", "15 * 4 = 60\nstill step two", "So \\boxed{60}."]
    assert split_steps("a\r\n\r\nb") == ["a", "b"]
    assert split_steps("") == [] and split_steps("\n\n  \n") == []


def test_join_roundtrip():
    steps = ["Step one.", "Line a\nline b", "\\boxed{3}"]
    assert join_steps(steps) == "Step one.\n\nLine a\nline b\n\n\\boxed{3}"
    assert split_steps(join_steps(steps)) == steps


def test_policy_prompt_is_chatml_with_cot_system(toy_tokenizer):
    problem = "Tom has 3 apples and buys 12 more. How many apples does he have?"
    expected = ("<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}."
                f"<|im_end|>\n<|im_start|>user\n{problem}<|im_end|>\n<|im_start|>assistant\n")
    assert DEFAULT_SYSTEM_PROMPT == "Please reason step by step, and put your final answer within \\boxed{}."
    assert policy_prompt_ids(toy_tokenizer, problem) == toy_tokenizer.encode(expected, add_special_tokens=False)
    custom = policy_prompt_ids(toy_tokenizer, problem, system_prompt="Be brief.")
    assert toy_tokenizer.decode(custom).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    none = policy_prompt_ids(toy_tokenizer, problem, system_prompt=None)
    assert toy_tokenizer.decode(none).startswith("<|im_start|>user\n")


def test_rollout_prefix(toy_tokenizer):
    steps = ["3 + 12 = 15", "15 * 4 = 60", "60 - 7 = 53"]
    assert rollout_prefix_text(steps, 0) == "3 + 12 = 15\n\n"
    assert rollout_prefix_text(steps, 1) == "3 + 12 = 15\n\n15 * 4 = 60\n\n"
    head = toy_tokenizer.encode("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    ids = rollout_prefix_ids(toy_tokenizer, "q", steps, 1, system_prompt=None)
    assert ids == head + toy_tokenizer.encode("3 + 12 = 15\n\n15 * 4 = 60\n\n", add_special_tokens=False)
    assert rollout_prefix_ids(toy_tokenizer, "q", steps, 1, system_prompt=None, prompt=head) == ids
    assert toy_tokenizer.decode(ids).endswith("assistant\n3 + 12 = 15\n\n15 * 4 = 60\n\n")
    with pytest.raises(IndexError):
        rollout_prefix_text(steps, 3)
