"""The three search strategies as per-problem state machines over a tree of partial solutions.

Each strategy says which nodes to expand and how many ways (`requests`), and takes the scored
children back (`update`); the engine runs the policy and the PRM for many problems at once.
A node is a partial solution (the policy's ids after the prompt); its path is the list of copy
indices from the root, which also fixes its children's random stream (see search.policy).
Children that end at EOS, state the final answer (`\\boxed{}`: StepConfig.stop_at_answer) or run out
of tokens are *finished* and go to a separate pool; only unfinished ones are expanded again, and only
finished ones are ever returned (search-and-learn's DVTS returns unfinished leaves too: its issue #57).

- best-of-n: N complete samples from the prompt.
- beam (search-and-learn's beam search): N rows per iteration. The kept beams are repeated in
  order up to N rows (kept beam b gets N//K copies, one more if b < N%K: M each while K = N/M
  beams are kept) and each row adds one step; finished rows leave; of the unfinished rows the
  N/M with the highest aggregated score are kept. Stops when N candidates have finished or none
  is left unfinished.
- dvts: N/M independent subtrees; each expands its current node M ways and moves greedily to its
  best child (by aggregated score), stopping when that child is finished; finished children of
  every subtree join the pool.
Both tree searches generate to the end (no delimiter stop) at iteration max_steps - 1, so they
always stop with finished candidates. Ranking ties break by path (the earliest row), so results
never depend on batching. The answer set is the N finished candidates with the best scores.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

STRATEGIES = ("best-of-n", "beam", "dvts")


@dataclasses.dataclass(frozen=True)
class Node:
    tokens: tuple[int, ...] = ()  # generated ids after the prompt (lookahead not included)
    path: tuple[int, ...] = ()
    finish: str | None = None  # None: unfinished; "eos" / "answer" / "length"
    step_scores: tuple[float, ...] = ()  # PRM scores of its steps (of its lookahead text with lookahead)
    score: float | None = None  # aggregated step_scores

    @property
    def finished(self) -> bool:
        return self.finish is not None


def rank_key(node: Node) -> tuple:
    """Sort key, best first: higher score, then the earlier path; unscored nodes last."""
    return (node.score is None, -(node.score or 0.0), node.path)


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    strategy: str = "beam"
    n: int = 4
    beam_width: int = 4  # M: children per kept beam (beam), per subtree step (dvts)
    agg: str = "last"
    max_steps: int = 40
    lookahead: int = 0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r}: expected one of {', '.join(STRATEGIES)}")
        if self.n < 1 or self.max_steps < 1 or self.lookahead < 0:
            raise ValueError(f"n and max_steps must be >= 1 and lookahead >= 0, got n={self.n}, "
                             f"max_steps={self.max_steps}, lookahead={self.lookahead}")
        if self.strategy != "best-of-n" and not (1 <= self.beam_width <= self.n and self.n % self.beam_width == 0):
            raise ValueError(f"beam width {self.beam_width} must divide n={self.n} (N/M beams are kept, "
                             f"each expanded M ways)")

    def run_name(self) -> str:
        """Names a run in the records: everything that changes what a strategy returns besides sampling."""
        if self.strategy == "best-of-n":
            return f"best-of-n/n={self.n}/agg={self.agg}"
        return (f"{self.strategy}/n={self.n}/m={self.beam_width}/agg={self.agg}/steps={self.max_steps}"
                f"/lookahead={self.lookahead}")


class Strategy:
    """requests() -> [(node, copies)] for this iteration ([] once done); update(children) with the
    scored children of those requests, per request, in path order."""

    def __init__(self, cfg: SearchConfig):
        self.cfg = cfg
        self.finished: list[Node] = []
        self.iteration = 0
        self.done = False

    @property
    def to_end(self) -> bool:
        """Whether this iteration generates solutions to their end (no delimiter stop)."""
        return self.iteration >= self.cfg.max_steps - 1

    def requests(self) -> list[tuple[Node, int]]:
        raise NotImplementedError

    def update(self, children: Sequence[Sequence[Node]]) -> None:
        raise NotImplementedError

    def candidates(self) -> list[Node]:
        """The N best finished candidates, best first."""
        return sorted(self.finished, key=rank_key)[:self.cfg.n]


class BestOfN(Strategy):
    @property
    def to_end(self) -> bool:
        return True

    def requests(self):
        return [] if self.done else [(Node(), self.cfg.n)]

    def update(self, children):
        self.finished.extend(children[0])
        self.done = True


class BeamSearch(Strategy):
    def __init__(self, cfg: SearchConfig):
        super().__init__(cfg)
        self.active = [Node()]

    def requests(self):
        if self.done:
            return []
        k, n = len(self.active), self.cfg.n
        return [(node, n // k + (b < n % k)) for b, node in enumerate(self.active)]

    def update(self, children):
        rows = [c for per_beam in children for c in per_beam]
        self.finished.extend(c for c in rows if c.finished)
        open_rows = sorted((c for c in rows if not c.finished), key=rank_key)
        self.active = sorted(open_rows[:self.cfg.n // self.cfg.beam_width], key=lambda c: c.path)
        self.iteration += 1
        self.done = len(self.finished) >= self.cfg.n or not self.active or self.iteration >= self.cfg.max_steps


class DVTS(Strategy):
    def __init__(self, cfg: SearchConfig):
        super().__init__(cfg)
        # Subtree s starts at the root under its own path (s,), so subtrees draw different samples.
        self.active = [Node(path=(s,)) for s in range(cfg.n // cfg.beam_width)]

    def requests(self):
        return [] if self.done else [(node, self.cfg.beam_width) for node in self.active]

    def update(self, children):
        nxt = []
        for per_tree in children:
            self.finished.extend(c for c in per_tree if c.finished)
            best = min(per_tree, key=rank_key)
            if not best.finished:
                nxt.append(best)
        self.active = nxt
        self.iteration += 1
        self.done = not self.active or self.iteration >= self.cfg.max_steps


def make_strategy(cfg: SearchConfig) -> Strategy:
    return {"best-of-n": BestOfN, "beam": BeamSearch, "dvts": DVTS}[cfg.strategy](cfg)
