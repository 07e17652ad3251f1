"""Peak resident memory of this process, and what the OS could still give a new one.

Why resident set and not XLA's own numbers: `compiled.memory_analysis()` under-reports on CPU, while the
kernel's high-water mark counts every buffer the call really touched.
"""

from __future__ import annotations

import gc
import resource

MIB = 1024 * 1024


def _read_status_kib(field: str) -> int | None:
    """One `/proc/self/status` field in KiB (e.g. `VmRSS`), or None where there is no such file or field."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark since it started (`ru_maxrss`, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Resident-set high-water mark of this process from `start()` to `stop()`, in bytes.

    The kernel's high-water mark (`VmHWM`) is reset first where Linux allows it (`/proc/self/clear_refs`), so
    an earlier peak (compilation's, say) cannot hide the measured one; elsewhere it falls back to `ru_maxrss`
    after minus before, which only sees peaks above every earlier one. `method` says which was used.
    """

    method: str = "ru_maxrss"
    before: int = 0

    def start(self) -> None:
        """Collect garbage, reset the high-water mark if possible, and remember the current level."""
        gc.collect()
        self.method = "ru_maxrss"
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # resets VmHWM to the current resident set
            self.method = "VmHWM"
        except OSError:
            pass
        rss = _read_status_kib("VmRSS") if self.method == "VmHWM" else None
        if rss is None:
            self.method = "ru_maxrss"
            self.before = peak_rss_bytes()
        else:
            self.before = rss * 1024

    def stop(self) -> int:
        """Bytes by which the high-water mark rose above the level at `start()` (never negative)."""
        hwm = _read_status_kib("VmHWM") if self.method == "VmHWM" else None
        after = peak_rss_bytes() if hwm is None else hwm * 1024
        return max(0, after - self.before)


def available_bytes() -> int:
    """Memory the OS says a new process could use without swapping (psutil's `available`)."""
    import psutil

    return int(psutil.virtual_memory().available)
