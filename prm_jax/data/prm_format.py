"""How a (problem, steps) pair becomes PRM input ids — shared by training and evaluation.

As the Qwen2.5-Math-PRM model card does it: the chat template with the CoT system prompt, the
problem as the user turn, the steps as the assistant turn with the step token after every step.
The step token is appended as an id, never spliced into text before tokenising (BPE merges
could move or swallow it); each step is tokenised on its own, which is exactly how a tokenizer
splits text around a special token.
"""
from __future__ import annotations

import logging

from prm_jax.errors import InputError
from prm_jax.models.qwen_vocab import STEP_TOKEN as DEFAULT_STEP_TOKEN  # the released PRM's (qwen_vocab owns it)
from prm_jax.models.qwen_vocab import adopt_official_step_token

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def resolve_step_token(tokenizer, step_token: str | int = DEFAULT_STEP_TOKEN) -> int:
    """The id of the step token. An int is taken as an id (checked against the vocab); `<extra_0>` missing from a
    stock Qwen2.5 tokenizer takes id 151651 (renamed from `<|quad_end|>`, the released PRM's layout); any other
    name the tokenizer lacks is added as a special token and the new id is logged."""
    if isinstance(step_token, int) or (isinstance(step_token, str) and step_token.isdigit()):
        token_id = int(step_token)
        if not 0 <= token_id < len(tokenizer):
            raise InputError(f"step token id {token_id} is outside the tokenizer's vocabulary of {len(tokenizer)}")
        return token_id
    vocab = tokenizer.get_vocab()
    if step_token in vocab:
        return vocab[step_token]
    if (token_id := adopt_official_step_token(tokenizer, step_token)) is not None:  # Qwen2.5: 151651 renamed
        return token_id
    tokenizer.add_special_tokens({"additional_special_tokens": [step_token]}, replace_extra_special_tokens=False)
    token_id = tokenizer.convert_tokens_to_ids(step_token)
    log.warning("tokenizer had no step token %r; added it as a special token with id %d", step_token, token_id)
    return token_id


def prompt_ids(tokenizer, problem: str, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> list[int]:
    """Token ids of the chat prefix up to the start of the assistant turn."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    messages.append({"role": "user", "content": problem})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def encode_prm(tokenizer, problem: str, steps: list[str], step_token_id: int,
               system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> list[int]:
    """PRM input ids: chat prefix, then each step's tokens followed by the step token id."""
    ids = prompt_ids(tokenizer, problem, system_prompt)
    for step in steps:
        ids.extend(tokenizer.encode(step, add_special_tokens=False))
        ids.append(step_token_id)
    return ids
