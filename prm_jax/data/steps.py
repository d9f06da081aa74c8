"""Steps of a solution, and the policy-side text a rollout continues from.

A generated solution is split into steps on blank lines (the convention of Qwen2.5-Math's CoT
output and of ProcessBench/PRM800K-style data). Joining uses "\\n\\n", so split(join(s)) == s for
steps that are already stripped and contain no blank line.

Policy prompt: the chat template with a system prompt (default Qwen2.5-Math's CoT prompt), the
problem as the user turn, and the generation prompt (start of the assistant turn) — the same
prefix the solutions were sampled from.

Rollout prefix for step i: that prompt's ids followed by the ids of
`join(steps[:i+1]) + "\\n\\n"`, tokenised on its own as plain text. Choices, and why:
- the assistant text is tokenised separately from the chat prefix, as it was when the policy
  generated it (generation appends new ids after the prompt ids; nothing re-tokenises across
  the boundary), so the prefix ids stay as close as possible to what the policy produced;
- the trailing "\\n\\n" closes step i the way the solution did, so a continuation starts a fresh
  step instead of extending step i's last line.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from prm_jax.data.prm_format import DEFAULT_SYSTEM_PROMPT, prompt_ids

STEP_SEPARATOR = "\n\n"
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


def split_steps(text: str) -> list[str]:
    """Steps of a solution text: split on blank lines, strip each, drop empties."""
    return [s.strip() for s in _BLANK_LINE.split(text.replace("\r\n", "\n")) if s.strip()]


def join_steps(steps: Sequence[str]) -> str:
    return STEP_SEPARATOR.join(steps)


def policy_prompt_ids(tokenizer, problem: str, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> list[int]:
    """Ids of the policy's chat prefix: [system,] user=problem, then the generation prompt."""
    return prompt_ids(tokenizer, problem, system_prompt)


def rollout_prefix_text(steps: Sequence[str], i: int) -> str:
    """Assistant text a rollout from step i (0-based) continues: steps[:i+1] joined, then "\\n\\n"."""
    if not 0 <= i < len(steps):
        raise IndexError(f"step index {i} out of range for {len(steps)} steps")
    return join_steps(steps[:i + 1]) + STEP_SEPARATOR


def rollout_prefix_ids(tokenizer, problem: str, steps: Sequence[str], i: int,
                       system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                       prompt: list[int] | None = None) -> list[int]:
    """Token ids of the rollout prefix for step i: chat prefix ids + ids of the step text.
    Pass `prompt` (the chat prefix ids) to avoid re-rendering the template for every step."""
    head = policy_prompt_ids(tokenizer, problem, system_prompt) if prompt is None else prompt
    return list(head) + tokenizer.encode(rollout_prefix_text(steps, i), add_special_tokens=False)
