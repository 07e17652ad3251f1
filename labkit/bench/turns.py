"""Interleaved measurement: several workers alive at once, taking turns call by call.

Why: on a shared or virtual machine the speed drifts over tens of seconds, so two points measured one after the
other can differ by 25% for reasons that have nothing to do with them. Workers that take turns (A's call, B's
call, A's, ...) see the same drift, and the ratio of their times is what one run can trust.

Protocol: the parent gives each worker two pipes. Before every call, warm-up calls included, the worker waits
for one byte on its `go` pipe; after the call it writes one byte to its `done` pipe. The parent (`TurnTaker`)
gives the turn to each worker in order, rotating which goes first each round, and waits for each to finish
before the next starts; a worker that has exited (it failed, or ran all its calls) is passed over. Between two
turns it pauses briefly (`SETTLE_S`): OpenMP's and XLA's worker threads spin for a moment after a call before
they sleep, and should not take the cores from the next worker's call.

What it cannot remove: each worker idles while the others run. On the course's virtual machine (2-core AMD
EPYC) an XLA call made after a few seconds of idling ran up to 1.9x slower than one made right after another
call, while torch's calls did not change; `--together` then penalises the JAX side, and back-to-back calls
(the default, one point after the other) are the fairer measure there. Compare both on a new machine.
"""

from __future__ import annotations

import os
import select
import time

SETTLE_S = 0.05


class Turn:
    """The worker's side: `wait()` before a call, `done()` after it (no-ops when not interleaved)."""

    def __init__(self, spec: dict):
        fds = spec.get("turn_fds")
        self.go, self.finished = (fds if fds else (None, None))

    def wait(self) -> None:
        """Block until the parent gives this worker the turn."""
        if self.go is not None:
            os.read(self.go, 1)

    def done(self) -> None:
        """Hand the turn back."""
        if self.finished is not None:
            os.write(self.finished, b".")


class TurnTaker:
    """The parent's side for `n` workers: the pipes to pass them, then `run(calls)` to take the turns."""

    def __init__(self, n: int):
        self.go = [os.pipe() for _ in range(n)]
        self.done = [os.pipe() for _ in range(n)]

    def worker_fds(self, index: int) -> tuple[int, int]:
        """`(go_read, done_write)` for worker `index`: pass them with `pass_fds` and in its spec."""
        return self.go[index][0], self.done[index][1]

    def close_worker_ends(self) -> None:
        """Close the parent's copies of the workers' ends, once the workers are started (so EOF means exit)."""
        for index in range(len(self.go)):
            for fd in self.worker_fds(index):
                os.close(fd)

    def run(self, calls: int, timeout_s: float) -> None:
        """Give `calls` turns to every worker, round by round; a worker that exits or stalls is left out."""
        alive = list(range(len(self.go)))
        for round_ in range(calls):
            order = alive[round_ % len(alive):] + alive[:round_ % len(alive)] if alive else []
            for index in order:
                time.sleep(SETTLE_S)
                if not self._one_turn(index, timeout_s):
                    alive.remove(index)
        for index in range(len(self.go)):
            os.close(self.go[index][1])
            os.close(self.done[index][0])

    def _one_turn(self, index: int, timeout_s: float) -> bool:
        """Let worker `index` run one call; False if it has gone (closed its pipe) or took over `timeout_s`."""
        try:
            os.write(self.go[index][1], b".")
        except BrokenPipeError:
            return False
        ready, _, _ = select.select([self.done[index][0]], [], [], timeout_s)
        return bool(ready) and os.read(self.done[index][0], 1) == b"."
