"""PNG plots of the evaluation (matplotlib, headless Agg backend)."""
from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from prm_jax.evaluation.metrics import min_position  # noqa: E402


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_f1(summary: dict, path: str) -> str:
    """Bar chart: F1 (and both accuracies) per ProcessBench subset, with the unweighted average."""
    names = list(summary["subsets"])
    val = lambda name, k: 100 * (summary["subsets"][name][k] or 0.0)  # noqa: E731
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 3, 4))
    width = 0.27
    xs = range(len(names))
    for off, key, label in ((-width, "acc_error", "acc. erroneous"), (0, "acc_correct", "acc. correct"),
                            (width, "f1", "F1")):
        ax.bar([x + off for x in xs], [val(n, key) for n in names], width, label=label)
    if summary.get("average_f1") is not None:
        ax.axhline(100 * summary["average_f1"], color="k", ls="--", lw=1,
                   label=f"average F1 {100 * summary['average_f1']:.1f}")
    ax.set_xticks(list(xs), names)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.set_title(f"ProcessBench (threshold {summary['threshold']:.3f}, {summary['threshold_mode']})")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_min_position(all_scores: Sequence[Sequence[float]], path: str, title: str, bins: int = 10) -> str:
    """Histogram of the relative position (0 = first step, 1 = final step) of each response's lowest
    step score; single-step responses count at 1."""
    rel = [p[1] for p in map(min_position, all_scores) if p is not None]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.hist(rel, bins=bins, range=(0, 1), edgecolor="k")
    ax.set_xlabel("relative position of the lowest step score")
    ax.set_ylabel("responses")
    ax.set_title(f"{title} (n={len(rel)})", fontsize=9)
    return _save(fig, path)


def plot_bon(curve: Sequence[dict], path: str, agg: str) -> str:
    """prm@N, maj@N and pass@N (accuracy) against N, log2 x axis."""
    ns = [c["n"] for c in curve]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key, label in (("pass", "pass@N"), ("maj", "maj@N"), ("prm", f"prm@N ({agg})")):
        ax.plot(ns, [100 * c[key] for c in curve], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("N (responses per problem)")
    ax.set_ylabel("accuracy %")
    ax.set_title("Best-of-N")
    ax.legend(fontsize=8)
    return _save(fig, path)
