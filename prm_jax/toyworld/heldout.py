"""The demo's held-out sets: a policy's samples as ProcessBench records, labelled by the toy
world's truth and balanced between correct and erroneous solutions (ProcessBench's mix), on which
the PRMs are scored and their thresholds tuned."""
from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from prm_jax.toyworld import world


def processbench_records(solutions: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The solutions as ProcessBench records with their true labels; an empty solution (no label) is left out."""
    return [r for r in map(world.processbench_record, solutions) if r is not None]


def balanced_set(records: Sequence[dict[str, Any]], problems: Sequence[Mapping[str, Any]], seed: int,
                 more: Callable[[], list[dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """`records` (ProcessBench records of the policy's samples on `problems`) balanced between
    erroneous (label >= 0) and correct (label -1) solutions: as many of each, erroneous first, each
    kind shuffled. The aim is half the records (at least 8) of each kind. Too few erroneous ones (a
    strong policy): `more()`, more of the policy's own samples as ProcessBench records, is called
    once first, so that the errors stay the policy's (its erroneous ones join with "-more" ids);
    then, for either kind, the world's reference or injected-error solutions fill the gap."""
    rng = random.Random(seed)
    wrong = [r for r in records if r["label"] >= 0]
    right = [r for r in records if r["label"] < 0]
    want = max(len(records) // 2, 8)
    if len(wrong) < want and more is not None:
        extra = [{**r, "id": f"{r['id']}-more"} for r in more() if r["label"] >= 0]
        wrong += extra[: want - len(wrong)]
    if len(right) < want:
        extra = world.sample_solutions(problems, seed=seed + 2, error_rate=0.0)
        right += [world.processbench_record(r) for r in extra][: want - len(right)]
    if len(wrong) < want:
        extra = world.sample_solutions(problems, seed=seed + 3, error_rate=1.0)
        wrong += [world.processbench_record(r) for r in extra][: want - len(wrong)]
    rng.shuffle(wrong)
    rng.shuffle(right)
    n = min(len(wrong), len(right))
    return wrong[:n] + right[:n]
