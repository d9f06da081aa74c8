"""The PRM as a reward for RL: a policy's (prompt, completion) becomes (problem, steps), the PRM scores
the steps, and one aggregate is the reward.

`process_reward` builds a reward function in Tunix's GRPO `reward_fns` signature,
`fn(prompts, completions, **kwargs) -> list[float]`, scoring in-process on the caller's mesh with
the same scorer as `prm-jax eval` (prm_jax.evaluation.scoring.PRMScorer). `prm-jax serve`'s
OpenRLHF endpoint (`POST /get_reward`) uses the same pieces, so both give the same reward.

Choices where the frameworks are silent:
- the problem is the last user turn of a ChatML prompt (what `apply_chat_template` renders for
  Qwen models), else the whole prompt text; the PRM re-renders it with its own chat template;
- a completion with no step (empty text) gets `empty_reward` (default 0.0), so one empty rollout
  does not stop a training run;
- a completion too long for `max_length` is an error (InputError naming it): a reward read from
  the steps that fit would silently ignore the later, often wrong, ones.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from prm_jax.data.prm_format import DEFAULT_STEP_TOKEN, DEFAULT_SYSTEM_PROMPT
from prm_jax.errors import InputError
from prm_jax.evaluation.metrics import AGGREGATIONS, aggregate
from prm_jax.evaluation.scoring import PRMScorer
from prm_jax.data.steps import split_steps

AGG_ALIASES = {"prod": "product"}
STEP_SPLITS = ("blank-line", "newline")  # or any literal separator string
_CHATML_USER = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.S)


def agg_name(agg: str) -> str:
    """The canonical aggregation name (`prod` is `product`); InputError for an unknown one."""
    name = AGG_ALIASES.get(agg, agg)
    if name not in AGGREGATIONS:
        raise InputError(f"agg {agg!r}: expected one of {', '.join(AGGREGATIONS + tuple(AGG_ALIASES))}")
    return name


def step_splitter(spec: str = "blank-line") -> Callable[[str], list[str]]:
    """How a completion becomes steps: `blank-line` (the project's convention, data.steps),
    `newline` (one step a line), or any other string taken as a literal separator. Steps are
    stripped and empty ones dropped."""
    if spec == "blank-line":
        return split_steps
    if spec == "":
        raise InputError("step split: expected 'blank-line', 'newline' or a non-empty separator string, got ''")
    sep = "\n" if spec == "newline" else spec
    return lambda text: [s.strip() for s in text.replace("\r\n", "\n").split(sep) if s.strip()]


def problem_of_prompt(prompt: str) -> str:
    """The problem inside a policy prompt: the last ChatML user turn, else the prompt itself."""
    users = _CHATML_USER.findall(prompt)
    return (users[-1] if users else prompt).strip()


def strip_special_tail(text: str, specials: Sequence[str]) -> str:
    """The text without the special tokens (e.g. `<|im_end|>`, `<|endoftext|>`) at its end, which a
    decode with special tokens kept leaves after a response."""
    specials = [s for s in specials if s]
    text = text.rstrip()
    while True:
        hit = next((s for s in specials if text.endswith(s)), None)
        if hit is None:
            return text
        text = text[:-len(hit)].rstrip()


def special_strings(tokenizer) -> list[str]:
    return list(getattr(tokenizer, "all_special_tokens", []) or [])


class StepReward:
    """(problem, completion) pairs -> (reward, step scores), through a PRMScorer. Shared by the
    Tunix reward function and the server's OpenRLHF endpoint."""

    def __init__(self, scorer: PRMScorer, agg: str = "min", step_split: str = "blank-line",
                 empty_reward: float = 0.0):
        self.scorer = scorer
        self.agg = agg_name(agg)
        self.split = step_splitter(step_split)
        self.empty_reward = float(empty_reward)
        self._specials = special_strings(scorer.tokenizer)

    def steps_of(self, completion: str) -> list[str]:
        return self.split(strip_special_tail(completion, self._specials))

    def check(self, problem: str, steps: Sequence[str], where: str):
        """The encoded pair; InputError naming `where` when it does not fit max_length."""
        try:
            enc = self.scorer.encode(problem, steps)
        except ValueError as e:  # a step token written out as text in the problem or a step
            raise InputError(f"{where}: {e}") from None
        if enc.truncated:
            raise InputError(f"{where}: {len(steps)} steps need more than max_length={self.scorer.max_length} "
                             f"tokens (only {len(enc.step_positions)} steps fit); expected a shorter text")
        return enc

    def reward(self, step_scores: Sequence[float]) -> float:
        value = aggregate(step_scores, self.agg)
        return self.empty_reward if value is None else value

    def __call__(self, problems: Sequence[str], completions: Sequence[str]) -> tuple[list[float], list[list[float]]]:
        items = [(p, self.steps_of(c)) for p, c in zip(problems, completions, strict=True)]
        for i, (problem, steps) in enumerate(items):
            self.check(problem, steps, f"completions[{i}]")
        scores = self.scorer.score(items)
        return [self.reward(s) for s in scores], scores


def process_reward(prm, tokenizer, agg: str = "min", *, step_split: str = "blank-line",
                   problem_key: str | None = None, empty_reward: float = 0.0, mesh=None,
                   batch_size: int = 32, max_length: int = 4096, tokens_per_batch: int | None = None,
                   buckets: Sequence[int] | None = None,
                   step_token: str | int = DEFAULT_STEP_TOKEN,
                   system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> Callable[..., list[float]]:
    """A Tunix GRPO reward function: `fn(prompts, completions, **kwargs) -> list[float]`, one
    aggregate PRM score (`agg`: min, last, prod/product, mean) per completion.

    Each completion is split into steps (`step_split`), paired with its problem (the last ChatML
    user turn of its prompt, or `kwargs[problem_key][i]` when the dataset carries the bare problem,
    since Tunix passes the batch's other fields as keyword arguments) and scored in one batched
    call on `mesh` (the caller's; None = unsharded)."""
    scorer = PRMScorer(prm, tokenizer, step_token=step_token, batch_size=batch_size, max_length=max_length,
                       mesh=mesh, system_prompt=system_prompt, tokens_per_batch=tokens_per_batch, buckets=buckets)
    rewarder = StepReward(scorer, agg, step_split, empty_reward)

    def prm_process_reward(prompts: Sequence[str], completions: Sequence[str], **kwargs) -> list[float]:
        if len(prompts) != len(completions):
            raise InputError(f"prompts: {len(prompts)} prompts for {len(completions)} completions; expected one each")
        if problem_key is not None:
            if problem_key not in kwargs:
                raise InputError(f"{problem_key}: no such keyword argument (got {sorted(kwargs)}); expected the "
                                 "batch field holding each completion's problem")
            problems = [str(p) for p in kwargs[problem_key]]
        else:
            problems = [problem_of_prompt(p) for p in prompts]
        return rewarder(problems, completions)[0]

    prm_process_reward.scorer = scorer  # the compiled shapes live here; handy for warm-up and tests
    return prm_process_reward
