"""PNG of search accuracy against N, one colour per strategy (the evaluation plots' style)."""
from __future__ import annotations

from collections.abc import Sequence

from prm_jax.evaluation.plots import plt

_STYLE = (("weighted", "-", "o", "weighted BoN"), ("majority", "--", "s", "majority"), ("pass", ":", "^", "pass@N"))


def plot_accuracy(rows: Sequence[dict], path: str) -> str:
    """rows: [{"strategy", "n", "weighted", "majority", "pass"}] (accuracies in [0, 1]); log2 x axis."""
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    ns = sorted({r["n"] for r in rows})
    for s, strategy in enumerate(strategies):
        mine = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r["n"])
        for key, ls, marker, label in _STYLE:
            ax.plot([r["n"] for r in mine], [100 * r[key] for r in mine], ls=ls, marker=marker,
                    color=colours[s % len(colours)], label=f"{strategy}: {label}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("N (candidates per problem)")
    ax.set_ylabel("accuracy %")
    ax.set_title("PRM-guided search")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
