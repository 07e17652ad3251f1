"""Run by tests/test_bench.py in worker processes: calls taken in turns (`labkit.bench.turns`), each one
recording when it ran, so the test can check that no two workers' calls overlapped."""

from __future__ import annotations

import sys
import time

from labkit.bench.turns import Turn


def record_calls(spec: dict) -> list:
    """`spec["calls"]` turns of a 20 ms call, as `[start, end]` monotonic times; raises at once if `spec["fail"]`.

    With `spec["chatty"]` each call also prints that many bytes to stdout and to stderr."""
    if spec.get("fail"):
        raise RuntimeError("this worker fails before its first turn")
    turn, spans = Turn(spec), []
    for _ in range(spec["calls"]):
        turn.wait()
        start = time.monotonic()
        time.sleep(0.02)
        for stream in (sys.stdout, sys.stderr):
            stream.write("x" * spec.get("chatty", 0) + "\n")
            stream.flush()
        spans.append([start, time.monotonic()])
        turn.done()
    return spans
