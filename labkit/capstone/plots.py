"""Plots of the capstone's memory measurements (the sweep's own plot lives in `sweep.plot_sweep`)."""

from __future__ import annotations

from pathlib import Path


def plot_memory(rows: list[dict], path: Path | None = None):
    """Peak MiB against depth (plain vs reversible stacks) and whole vs chunked feed-forward, from `rows`."""
    import matplotlib.pyplot as plt

    rows = [row for row in rows if not row.get("error")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for kind in ("plain", "reversible"):
        mine = sorted((r for r in rows if r["kind"] == kind), key=lambda r: int(r["depth"]))
        left.plot([int(r["depth"]) for r in mine], [float(r["peak_extra_mib"]) for r in mine], marker="o",
                  label=f"{kind} residual stack")
    plain = sorted((r for r in rows if r["kind"] == "plain"), key=lambda r: int(r["depth"]))
    left.plot([int(r["depth"]) for r in plain], [float(r["param_mib"]) for r in plain], ls="--", c="gray",
              label="weights alone")
    left.set(xlabel="depth (blocks)", ylabel="peak extra MiB, forward + backward")
    left.legend(fontsize=8)
    ffs = [r for r in rows if str(r["kind"]).startswith("ff_")]
    right.bar([str(r["kind"])[3:] for r in ffs], [float(r["peak_extra_mib"]) for r in ffs])
    right.set(ylabel="peak extra MiB, forward + backward", title="feed-forward over the whole sequence")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
