"""Time and peak extra memory against sequence length, log-log, one line per implementation."""

from __future__ import annotations

from labkit.bench.measurement import Measurement
from labkit.bench.tables import variant


def plot(results: list[Measurement], path: str | None = None):
    """Time and peak extra memory against length, log-log, one line per implementation; returns the figure."""
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(10, 4))
    series: dict[str, list[Measurement]] = {}
    for m in results:
        if m.ok:
            label = m.impl + ("" if not (m.causal or m.backward) else f" ({variant(m)})")
            series.setdefault(label, []).append(m)
    for label, points in series.items():
        points.sort(key=lambda m: m.seq_len)
        lengths = [m.seq_len for m in points]
        ax_time.plot(lengths, [m.time_s for m in points], marker="o", label=label)
        ax_mem.plot(lengths, [max(m.peak_extra_mib, 1e-2) for m in points], marker="o", label=label)
    for ax, ylabel in ((ax_time, "time per call (s)"), (ax_mem, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend()
    skipped = [f"{m.impl}@{m.seq_len}" for m in results if not m.ok]
    fig.suptitle("attention: time and memory vs length (measured)" +
                 (f"\nnot measured: {', '.join(skipped)}" if skipped else ""), fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
