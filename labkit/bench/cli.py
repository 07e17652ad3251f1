"""`python -m labkit bench` / `python -m labkit.bench`: sweep, print the table, optionally write JSON and a plot.

    python -m labkit bench --impl dense,memory_efficient --seq 1024,4096 --heads 4 --head-dim 64 \\
        [--causal] [--backward] [--json out.json] [--plot out.png] [--repeats N] [--option NAME=VALUE]
    python -m labkit bench --impl memory_efficient,torch --baseline torch --all-variants --together --seq 4096,16384
    python -m labkit bench --impl memory_efficient,torch --option memory_efficient:devices=2 --seq 16384
    python -m labkit bench --tune [--seq 4096,16384]

`--all-variants` measures forward, causal forward, forward + backward and causal forward + backward in one run
and ends with a table of time ratios to the baseline (labkit / torch with `--baseline torch`); `--together` runs
the implementations at each length side by side, taking turns call by call (`labkit.bench.turns`). `--tune` runs
`labkit.bench.tune`'s short sweep and caches this machine's chunk sizes for `memory_efficient_attention`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from labkit.bench.implementations import IMPLEMENTATIONS
from labkit.bench.measuring import sweep
from labkit.bench.plotting import plot
from labkit.bench.tables import ratio_table, table


def _int_list(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def _option(text: str) -> tuple[str, Any]:
    name, _, value = text.partition("=")
    if not name or not value:
        raise argparse.ArgumentTypeError(f"--option wants NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def _parser() -> argparse.ArgumentParser:
    """The command's options."""
    parser = argparse.ArgumentParser(
        prog="python -m labkit bench",
        description="Time and peak memory of attention implementations against sequence length, "
                    "one fresh process per point.")
    parser.add_argument("--impl", default="dense,memory_efficient",
                        help=f"comma-separated, from: {', '.join(IMPLEMENTATIONS)}")
    parser.add_argument("--seq", type=_int_list, default=None,
                        help="comma-separated sequence lengths (default 1024,4096; with --tune 4096,16384)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--backward", action="store_true", help="time forward + gradient w.r.t. q, k, v")
    parser.add_argument("--all-variants", action="store_true",
                        help="forward and forward + backward, causal and not, then a table of time ratios")
    parser.add_argument("--together", action="store_true",
                        help="measure the implementations at each length at once, taking turns call by call, so "
                             "their time ratios survive a drifting machine (each idles while the others run: "
                             "see labkit.bench.turns)")
    parser.add_argument("--tune", action="store_true",
                        help="time a few chunk sizes of memory_efficient_attention and cache the fastest")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per point")
    parser.add_argument("--baseline", default=None,
                        help="implementation the ratios refer to (default: dense if measured, else torch, "
                             "else the first of --impl)")
    parser.add_argument("--option", type=_option, action="append", default=[],
                        help="NAME=VALUE passed to every implementation, e.g. query_chunk_size=512; "
                             "IMPL:NAME=VALUE to that one only, e.g. memory_efficient:devices=2")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--plot", help="write the time/memory plot to this image file")
    return parser


def _baseline(requested: str | None, impls: list[str]) -> str | None:
    """The implementation the ratios refer to: the one asked for, else dense, torch or the first measured."""
    if requested is not None:
        return requested if requested in impls else None
    return next((name for name in ("dense", "torch") if name in impls), impls[0] if impls else None)


def main(argv: list[str] | None = None) -> int:
    """Run the sweep the arguments describe; 0 unless a point failed (skipped points are not failures)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.tune:
        from labkit.bench import tune

        print(tune.report(tune.tune(args.seq or tune.SEQ_LENS, heads=args.heads, head_dim=args.head_dim)))
        return 0
    impls = [x.strip() for x in args.impl.split(",") if x.strip()]
    unknown = [x for x in impls if x not in IMPLEMENTATIONS]
    if unknown:
        parser.error(f"unknown --impl {', '.join(unknown)}; choose from {', '.join(IMPLEMENTATIONS)}")
    baseline = _baseline(args.baseline, impls)
    if baseline is None:
        parser.error(f"--baseline {args.baseline} is not among --impl {', '.join(impls)}")
    variants = [(c, b) for b in (False, True) for c in (False, True)] if args.all_variants else \
        [(args.causal, args.backward)]
    results = []
    for causal, backward in variants:
        results += sweep(impls, args.seq or [1024, 4096], batch=args.batch, heads=args.heads,
                         head_dim=args.head_dim, causal=causal, backward=backward, repeats=args.repeats,
                         warmup=args.warmup, timeout_s=args.timeout, together=args.together, **dict(args.option))
    print(table(results, baseline=baseline))
    if args.all_variants:
        print()
        print(ratio_table(results, baseline=baseline))
    if args.json:
        with open(args.json, "w") as out:
            json.dump([m.to_dict() for m in results], out, indent=1)
    if args.plot:
        plot(results, args.plot)
    return 1 if any(m.status == "failed" for m in results) else 0
