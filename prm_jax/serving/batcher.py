"""Dynamic batching for the server: requests queue, one scoring thread takes a batch when the queued
tokens reach a budget or the oldest request has waited `max_wait_ms`, scores it with the same jitted,
bucketed forward as `prm-jax eval` (PRMScorer), and answers each request with its own rows.

The scoring thread is the only one that touches the model, so batches never interleave; the event
loop only queues and awaits. A full queue refuses at once (the server answers 503) instead of
letting latency grow without bound. An error in a batch fails that batch's requests, not the thread.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Sequence

from prm_jax.evaluation.scoring import Encoded, PRMScorer

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds max_queue requests already."""


class EncodedScorer(PRMScorer):
    """A PRMScorer that also takes items already encoded (`(Encoded, None)`), so the server can
    check a request's tokens when it arrives and the scoring thread does not encode it again.
    Everything else, bucketing and the jitted forward included, is PRMScorer's."""

    def encode(self, problem, steps) -> Encoded:
        if isinstance(problem, Encoded):
            return problem
        return super().encode(problem, steps)


@dataclasses.dataclass
class _Job:
    encoded: list[Encoded]
    tokens: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    max_batch_tokens: int = 16384  # tokens (up to each input's last step token) gathered per batch
    max_wait_ms: float = 5.0  # how long the oldest request may wait for company
    max_queue: int = 1024  # requests waiting; one more gets 503


class Batcher:
    def __init__(self, scorer: EncodedScorer, config: BatchConfig = BatchConfig()):
        self.scorer = scorer
        self.config = config
        self._jobs: collections.deque[_Job] = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self.batches = 0  # batches scored (for logs and tests)
        self._thread = threading.Thread(target=self._run, name="prm-batcher", daemon=True)
        self._thread.start()

    def submit(self, encoded: Sequence[Encoded]) -> asyncio.Future:
        """Queue one request's inputs; the future resolves to their step-probability rows
        ([p_right per step token] each), in order. Raises QueueFull."""
        loop = asyncio.get_running_loop()
        job = _Job(list(encoded), sum(len(e.ids) for e in encoded), loop.create_future(), loop, time.monotonic())
        with self._cv:
            if len(self._jobs) >= self.config.max_queue:
                raise QueueFull(f"{len(self._jobs)} requests queued (--max-queue {self.config.max_queue})")
            self._jobs.append(job)
            self._cv.notify()
        return job.future

    def queued(self) -> int:
        with self._cv:
            return len(self._jobs)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=60)

    def _take(self) -> list[_Job] | None:
        """Wait for a batch: jobs up to the token budget (always at least one), once the budget is
        reached or the oldest job has waited max_wait_ms. None when closing."""
        budget, wait_s = self.config.max_batch_tokens, self.config.max_wait_ms / 1000
        with self._cv:
            while not self._jobs and not self._stop:
                self._cv.wait()
            if self._stop:
                return None
            while not self._stop:
                left = self._jobs[0].arrived + wait_s - time.monotonic()
                if left <= 0 or sum(j.tokens for j in self._jobs) >= budget:
                    break
                self._cv.wait(timeout=left)
            batch, tokens = [], 0
            while self._jobs and (not batch or tokens + self._jobs[0].tokens <= budget):
                job = self._jobs.popleft()
                batch.append(job)
                tokens += job.tokens
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            live = [j for j in batch if not j.future.done()]  # a cancelled request is not scored
            try:
                items = [(e, None) for j in live for e in j.encoded]
                rows = self.scorer.score(items) if items else []
                self.batches += 1
            except Exception as e:  # noqa: BLE001 -- answered as a 500 to this batch; the thread lives on
                log.exception("scoring a batch of %d requests failed", len(live))
                for j in live:
                    _answer(j, _fail, e)
                continue
            start = 0
            for j in live:
                _answer(j, _resolve, rows[start:start + len(j.encoded)])
                start += len(j.encoded)


def _answer(job: _Job, how, value) -> None:
    try:
        job.loop.call_soon_threadsafe(how, job.future, value)
    except RuntimeError:  # the server's loop closed while this batch ran (shutdown): nobody to answer
        pass


def _resolve(future: asyncio.Future, rows) -> None:
    if not future.done():  # the client may have gone away meanwhile
        future.set_result(rows)


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def warm_up(scorer: PRMScorer) -> int:
    """Compile the forward for every (rows, length) shape a batch plan may use (that many filler
    inputs of that length, step token last), so no request waits for a compile. Returns the number
    of shapes compiled."""
    for rows, length in sorted(scorer.rules.shapes()):
        ids = (scorer.pad_id,) * (length - 1) + (scorer.step_token_id,)
        scorer.score([(Encoded(ids, (length - 1,), 1), None)] * rows)
    return len(scorer.shapes_used)
