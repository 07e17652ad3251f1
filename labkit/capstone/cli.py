"""`python -m labkit capstone [--full] [--out DIR]`: lab 08's sweep, resumable, with CSVs and plots.

Writes `DIR/sweep.csv` (one row per task, family, length and seed: accuracy, step time, peak memory,
parameters, the CPU and the command), `DIR/recall.png`, `DIR/listops.png`, and the memory measurements
`DIR/memory.csv` + `DIR/memory.png` (plain vs reversible stacks against depth; whole vs chunked feed-forward).
Without `--full` a quick grid (one length, few steps) checks that everything runs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from labkit.capstone.models import CAUSAL_FAMILIES
from labkit.capstone.sweep import Settings, plot_sweep, run_sweep

FULL = Settings(recall_families=CAUSAL_FAMILIES, listops_families=("dense", "linear", "linformer"),
                recall_lengths=(64, 256), listops_lengths=(128,), steps=200, n_layers=1)
QUICK = Settings(recall_families=("dense", "linear"), listops_families=("dense",), recall_lengths=(64,),
                 listops_lengths=(64,), steps=5, n_layers=1)
DEPTHS = (1, 2, 4, 8)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m labkit capstone", description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the full grid (about 10 minutes on 2 cores)")
    parser.add_argument("--out", type=Path, default=Path("results/capstone"), help="output folder")
    parser.add_argument("--no-memory", action="store_true", help="skip the depth / feed-forward memory points")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def write_memory(out: Path, depths=DEPTHS) -> list[dict]:
    """Measure and write `memory.csv` and `memory.png`: peak MiB of plain vs reversible stacks, and the FF."""
    import csv

    from labkit.capstone.memory import DEPTH_TARGET, FF_TARGET, memory_rows
    from labkit.capstone.plots import plot_memory

    stacks = [dict(kind=kind, depth=depth, batch=1, seq=1024, d_model=128, heads=2, d_ff=512)
              for kind in ("plain", "reversible") for depth in depths]
    ffs = [dict(kind="ff_" + ("chunked" if chunk else "whole"), batch=1, seq=16384, d_model=64, d_ff=1024,
                chunk=chunk) for chunk in (None, 1024)]
    rows = memory_rows(DEPTH_TARGET, stacks) + memory_rows(FF_TARGET, ffs)
    columns = sorted({name for row in rows for name in row})
    with (out / "memory.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    plot_memory(rows, out / "memory.png")
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the sweep (and the memory points), write CSVs and plots under `--out`; 0 if every run worked."""
    args = _parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = FULL if args.full else QUICK
    start = time.perf_counter()
    rows = run_sweep(settings.specs(), args.out / "sweep.csv", progress=not args.no_progress)
    for task in ("recall", "listops"):
        plot_sweep(rows, args.out / f"{task}.png", task=task)
    if not args.no_memory:
        write_memory(args.out)
    failed = [row for row in rows if row.get("error")]
    print(f"{len(rows)} runs in {args.out / 'sweep.csv'} ({len(failed)} failed), "
          f"{time.perf_counter() - start:.0f} s")
    return 1 if failed else 0
