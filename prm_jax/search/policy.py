"""The policy side of search: extend partial solutions by one step with the JAX sampler.

A step ends where the policy writes the step delimiter ("\\n\\n", the blank line that
prm_jax.data.steps splits solutions on), as a stop string: the sampler matches it over the
tokens' texts (sampler.stop_string_table), so ".\\n\\n" in one Qwen token and "\\n" + "\\n" in two
both end a step. A solution's steps are always re-read from its whole decoded text with
`split_steps`, so text a stop token carries after the blank line simply opens the next step.

Candidates keep the policy's own token ids (never re-tokenised text), and all children of one
kept candidate are sampled in one `generate_from_prefixes` call, which prefills their shared
prefix once. A call that asks for it (keep=True) also returns its rows' KV caches
(sampler.KVRows), and the next call passes them back (reuse=): a kept candidate's prompt and
steps are then never prefilled again, only its last generated token is fed once more (for its
logits). Row j of node P draws from the stream (seed, key(problem id, P's path), j), so what a
node's children are does not depend on batching, other problems, a resume, or the reuse.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

from prm_jax.data.steps import STEP_SEPARATOR
from prm_jax.grading import last_boxed
from prm_jax.sampling.ids import default_stop_ids, stable_key_id
from prm_jax.sampling.sampler import KVRows, generate_from_prefixes, last_stats, stop_string_table

FINISH_EOS, FINISH_LENGTH, FINISH_ANSWER = "eos", "length", "answer"


@functools.lru_cache(maxsize=8)
def delimiter_table(tokenizer, delimiter: str, vocab: int):
    """The sampler's stop-string matcher for the delimiter over the policy's vocabulary (ids the
    tokenizer lacks, in a padded embedding, have no text)."""
    texts = tokenizer.batch_decode([[i] for i in range(min(len(tokenizer), vocab))])
    return stop_string_table(texts + [""] * (vocab - len(texts)), delimiter)


def node_key(problem_id, path: Sequence[int]) -> int:
    """The sampler key_id of a node's children: from the problem id and the node's path in the tree."""
    return stable_key_id(f"{problem_id}/{'.'.join(map(str, path))}")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    max_tokens: int = 1024  # new tokens per generation call (one step, or the rest of a solution)
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    delimiter: str = STEP_SEPARATOR
    context: int = 32768  # the policy's max_position_embeddings
    # A step that states the final answer (`\boxed{...}`) finishes its candidate even when the policy wrote the
    # delimiter after it instead of EOS: what follows an answer is not part of the solution (seen in the demo's
    # beams: "... \boxed{1}." then "Start again: ..." and another answer, which became the candidate's).
    stop_at_answer: bool = True


@dataclasses.dataclass(frozen=True)
class Request:
    """Sample `copies` continuations of `tokens` (prompt + generated ids) with random stream `key`."""
    tokens: tuple[int, ...]
    key: int
    copies: int


@dataclasses.dataclass(frozen=True)
class Segment:
    tokens: tuple[int, ...]  # the new ids (a stop id included)
    finish: str | None  # None: ended at the delimiter, the solution goes on


class Stepper:
    """Batched one-step (or to-the-end) continuation of many partial solutions."""

    def __init__(self, model, tokenizer, cfg: StepConfig = StepConfig(), mesh=None, reuse_kv: bool = True):
        self.model, self.tokenizer, self.cfg, self.mesh = model, tokenizer, cfg, mesh
        self.eos_ids = frozenset(default_stop_ids(tokenizer))
        self.table = delimiter_table(tokenizer, cfg.delimiter, model.cfg.vocab_size)
        self.reuse_kv = reuse_kv  # False: every call prefills its prefixes whole (for comparisons)
        self.tokens_generated = 0  # every id the sampler returned, lookahead included
        self.tokens_prefilled = 0  # prompt + candidate ids the sampler ran through the model

    def prefill_cost(self, requests: Sequence[Request], reuse: KVRows | None) -> list[int]:
        """Per request, the ids its call prefills for it: its tokens less what `reuse` holds of them,
        0 for a request with the same tokens as an earlier one of the call (one prefill serves both)."""
        if not requests or self._room(requests) < 1:
            return [0] * len(requests)
        seen, out = set(), []
        for r in requests:
            k = reuse.reusable(r.tokens)[1] if reuse is not None and self.reuse_kv else 0
            out.append(0 if r.tokens in seen else len(r.tokens) - k)
            seen.add(r.tokens)
        return out

    def run(self, requests: Sequence[Request], to_end: bool = False, greedy: bool = False,
            reuse: KVRows | None = None, keep: bool = False) -> tuple[list[list[Segment]], KVRows | None]:
        """`copies` segments per request, each ending at the delimiter, at EOS, or after max_tokens
        (to_end: no delimiter stop; greedy: temperature 0, as search-and-learn's lookahead steps),
        and with keep the rows' KV caches for the next call's `reuse` (None without keep, with
        reuse_kv=False, or when nothing was sampled)."""
        if not requests:
            return [], None
        room = self._room(requests)
        if room < 1:  # no room for a single token: every copy ends here, unextended
            return [[Segment((), FINISH_LENGTH)] * r.copies for r in requests], None
        keep &= self.reuse_kv
        outs = generate_from_prefixes(self.model, [list(r.tokens) for r in requests], [r.copies for r in requests],
                                      room, temperature=0.0 if greedy else self.cfg.temperature,
                                      top_p=self.cfg.top_p, top_k=self.cfg.top_k, seed=self.cfg.seed,
                                      stop_ids=sorted(self.eos_ids), mesh=self.mesh, key_ids=[r.key for r in requests],
                                      stop_table=None if to_end else self.table,
                                      reuse=reuse if self.reuse_kv else None, return_cache=keep)
        outs, kept = outs if keep else (outs, None)
        self.tokens_prefilled += last_stats().prefill_tokens
        result = []
        for r, rows in zip(requests, outs):
            segs = []
            for ids in rows:
                self.tokens_generated += len(ids)
                segs.append(Segment(tuple(ids), self._finish(ids, len(r.tokens), to_end)))
            result.append(segs)
        return result, kept

    def _room(self, requests: Sequence[Request]) -> int:
        """New tokens a call may generate: a row must fit the context, prefix plus max_tokens (its
        cache holds both)."""
        return min(self.cfg.max_tokens, self.cfg.context - max(len(r.tokens) for r in requests))

    def _finish(self, ids: Sequence[int], prefix_len: int, to_end: bool) -> str | None:
        if ids and ids[-1] in self.eos_ids:
            return FINISH_EOS
        text = self.text(ids)  # decoded once per segment
        if self.cfg.stop_at_answer and last_boxed(text) is not None:
            return FINISH_ANSWER
        if to_end or self.cfg.delimiter not in text:
            return FINISH_LENGTH
        if prefix_len + len(ids) >= self.cfg.context:  # ended at a delimiter, but nothing more fits
            return FINISH_LENGTH
        return None

    def text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
