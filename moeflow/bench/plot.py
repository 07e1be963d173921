"""The suite's plot: decode tok/s against batch size, each engine a line, beside the bandwidth
roofline (matplotlib, imported when a plot is asked for)."""

from __future__ import annotations

from typing import Any


def plot(report: dict[str, Any], path: str) -> None:
    """tok/s against decode batch size, each engine a line, beside the bandwidth roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in report["results"]:
        pts = [(d["batch"], d["tok_s"]) for d in r["decode"]]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=r["name"])
    roof = [
        (d["batch"], d["roofline_tok_s"])
        for d in report["results"][0]["decode"]
        if d["roofline_tok_s"]
    ]
    if roof:
        ax.plot(*zip(*roof, strict=True), linestyle="--", color="gray", label="bandwidth roofline")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("decode batch size")
    ax.set_ylabel("output tok/s")
    ax.set_title(f"{report['model']} decode, {report['dtype']}, {report['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
