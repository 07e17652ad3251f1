"""What machine this is, for the figures labkit reports next to their numbers."""

from __future__ import annotations

import functools
import platform
from pathlib import Path


def cpu_from_cpuinfo(text: str) -> str | None:
    """The first CPU's model name in Linux's /proc/cpuinfo text, with its family and model numbers, or None.

    Virtual machines often report a bare name ("AMD EPYC") for different generations (Zen 4 is family 25,
    Zen 5 family 26): the numbers keep figures and tuned block sizes of one apart from the other's.
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the end of the first processor's block
        name, _, value = line.partition(":")
        fields.setdefault(name.strip().lower(), value.strip())
    if "model name" not in fields:
        return None
    numbers = [f"{label} {fields[key]}" for key, label in (("cpu family", "family"), ("model", "model"))
               if fields.get(key)]
    return fields["model name"] + (f" ({', '.join(numbers)})" if numbers else "")


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """This machine's CPU, e.g. `"AMD EPYC (family 26, model 2)"` (/proc/cpuinfo, else `platform`)."""
    try:
        found = cpu_from_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        found = None
    return found or platform.processor() or platform.machine() or "unknown cpu"
