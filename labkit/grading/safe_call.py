"""Run untrusted learner code so that nothing it does can escape `check` or kill the kernel.

A call gets a wall-clock limit (SIGALRM in the main thread, so `time.sleep` and Python loops are
interrupted; elsewhere a watcher thread injects an exception), its printing is captured and capped, and
every exception, `SystemExit` and `KeyboardInterrupt` included, becomes data in a `CallResult`.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import io
import signal
import threading
import traceback
from typing import Any, Callable

MAX_KEPT_OUTPUT = 2000


class CandidateTimeout(BaseException):
    """Raised inside learner code when its time is up (BaseException: `except Exception` won't eat it)."""


@dataclasses.dataclass
class CallResult:
    """What happened when a candidate ran: its value, or how it failed, and what it printed."""

    value: Any = None
    error: BaseException | None = None
    where: str = ""  # "line 3 in attention: scores = q @ k" for the innermost learner frame
    timed_out: bool = False
    printed_chars: int = 0
    printed_head: str = ""

    @property
    def ok(self) -> bool:
        """True when the call returned normally."""
        return self.error is None and not self.timed_out


class _CappedText(io.TextIOBase):
    """A text sink that counts everything written but keeps only the first few thousand characters."""

    def __init__(self):
        self.count = 0
        self.head = []
        self._kept = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.count += len(text)
        if self._kept < MAX_KEPT_OUTPUT:
            piece = text[: MAX_KEPT_OUTPUT - self._kept]
            self.head.append(piece)
            self._kept += len(piece)
        return len(text)


def root_cause(error: BaseException) -> BaseException:
    """Unwrap Trax's LayerError, whose message is a long traceback, down to the learner's exception."""
    while type(error).__name__ == "LayerError" and (error.__cause__ or error.__context__):
        error = error.__cause__ or error.__context__
    return error


def _innermost_frame(error: BaseException) -> str:
    """Describe the deepest traceback frame outside labkit, jax and numpy: the learner's line."""
    frames = traceback.extract_tb(error.__traceback__)
    skip = ("labkit/grading", "site-packages", "/jax/", "/numpy/")
    mine = [f for f in frames if not any(s in f.filename for s in skip)]
    if not mine:
        return ""
    f = mine[-1]
    return f"line {f.lineno} in {f.name}: {f.line}" if f.line else f"line {f.lineno} in {f.name}"


def _call_with_alarm(fn: Callable[[], Any], seconds: float) -> Any:
    """Run `fn` in this (main) thread, raising CandidateTimeout inside it after `seconds`."""
    active = [True]

    def on_alarm(signum, frame):
        if active[0]:
            raise CandidateTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    # Re-fire every 50 ms after the deadline in case learner code swallows the first one.
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)
    try:
        return fn()
    finally:
        active[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _call_in_thread(fn: Callable[[], Any], seconds: float) -> Any:
    """Run `fn` in a worker thread; after `seconds`, inject CandidateTimeout into it and give up."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - learner code may raise anything
            box["error"] = err

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident), ctypes.py_object(CandidateTimeout))
        worker.join(1.0)
        raise CandidateTimeout()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def safe_call(fn: Callable[[], Any], *, timeout: float) -> CallResult:
    """Call `fn()` with a time limit and captured output; never raises."""
    sink = _CappedText()
    result = CallResult()
    in_main = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM")
    runner = _call_with_alarm if in_main else _call_in_thread
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            result.value = runner(fn, timeout)
    except CandidateTimeout:
        result.timed_out = True
    except BaseException as err:  # noqa: BLE001 - SystemExit, KeyboardInterrupt: all become reports
        result.error = err
        result.where = _innermost_frame(err)
    result.printed_chars = sink.count
    result.printed_head = "".join(sink.head)
    return result
