"""Plain-text table of benchmark points, with time and memory ratios to a baseline at the same size."""

from __future__ import annotations

from labkit.bench.measurement import Measurement


def variant(m: Measurement) -> str:
    """What a point ran, as a label: "forward" or "fwd+bwd", after "causal" when it was."""
    return ", ".join(filter(None, ["causal" if m.causal else "", "fwd+bwd" if m.backward else "forward"]))


def table(results: list[Measurement], baseline: str = "dense") -> str:
    """Plain-text table: time, time per token, peak extra MiB (first call; over all calls), ratios to `baseline`."""
    base = {(m.seq_len, m.batch, m.heads, m.head_dim, m.causal, m.backward): m
            for m in results if m.impl == baseline and m.ok}
    short = baseline[:6]
    header = (f"{'impl':<16} {'seq':>6} {'variant':<15} {'time ms':>9} {'us/token':>8} {'peak MiB':>8} {'all MiB':>7} "
              f"{'t/' + short:>8} {'mem/' + short:>10}  status")
    lines = [header, "-" * len(header)]
    for m in results:
        ref = base.get((m.seq_len, m.batch, m.heads, m.head_dim, m.causal, m.backward))
        if m.ok:
            t_ratio = f"{m.time_s / ref.time_s:.2f}x" if ref else "-"
            m_ratio = (f"{m.peak_extra_mib / ref.peak_extra_mib:.3f}x"
                       if ref and ref.peak_extra_mib else "-")
            per_token = m.time_s / (m.batch * m.seq_len) * 1e6
            steady = "-" if m.steady_extra_mib is None else f"{m.steady_extra_mib:.1f}"
            lines.append(f"{m.impl:<16} {m.seq_len:>6} {variant(m):<15} {m.time_s * 1e3:>9.1f} {per_token:>8.2f} "
                         f"{m.peak_extra_mib:>8.1f} {steady:>7} {t_ratio:>8} {m_ratio:>10}  ok")
        else:
            lines.append(f"{m.impl:<16} {m.seq_len:>6} {variant(m):<15} {'-':>9} {'-':>8} {'-':>8} {'-':>7} {'-':>8} "
                         f"{'-':>10}  {m.status}: {m.message}")
    return "\n".join(lines)


def ratio_table(results: list[Measurement], baseline: str) -> str:
    """Time ratios impl / `baseline`, one row per implementation and length, one column per variant measured."""
    times = {(m.impl, m.seq_len, m.causal, m.backward): m.time_s for m in results if m.ok}
    columns = sorted({(m.causal, m.backward) for m in results}, key=lambda cb: (cb[1], cb[0]))
    names = [variant(Measurement("", 0, causal=c, backward=b)) for c, b in columns]
    lines = [f"{('time / ' + baseline)[:17]:<17}: " + " | ".join(f"{name:>15}" for name in names)]
    for impl in dict.fromkeys(m.impl for m in results if m.impl != baseline):
        for seq in sorted({m.seq_len for m in results if m.impl == impl}):
            cells = []
            for causal, backward in columns:
                mine, ref = times.get((impl, seq, causal, backward)), times.get((baseline, seq, causal, backward))
                cells.append(f"{mine / ref:>14.2f}x" if mine and ref else f"{'-':>15}")
            lines.append(f"{impl[:10]:<10} {seq:>6}: " + " | ".join(cells))
    missing = sorted({m.message for m in results if m.impl == baseline and not m.ok})
    return "\n".join(lines + [f"({baseline} not measured: {why})" for why in missing])
