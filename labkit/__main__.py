"""`python -m labkit <command> [args]` (and the `labkit` console script).

Each command lives in its own module, imported only when that command runs, so a missing or broken module
fails its own command with a clear message and leaves the others working.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "release": ("labkit.release", "build student notebooks from the solved masters (--check to verify)"),
    "doctor": ("labkit.doctor", "print versions and run a tiny Trax / labkit attention forward pass"),
    "bench": ("labkit.bench", "time and peak memory of attention implementations"),
    "grade": ("labkit.grading.batch", "grade submitted notebooks"),
    "ring": ("labkit.ring", "ring attention across several processes (jax.distributed), checked against one"),
    "capstone": ("labkit.capstone.cli", "lab 08's comparison: every family trained on long-context tasks (--full)"),
}


def usage() -> str:
    """The usage text listing every command."""
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m labkit <command> [args]", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "`python -m labkit <command> --help` describes a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch `argv` (default `sys.argv[1:]`) to `labkit.<module>.main`; 2 with usage if no such command."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        if argv:
            print(f"labkit: unknown command {argv[0]!r}", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    command, *rest = argv
    module_name = COMMANDS[command][0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        print(f"labkit {command}: cannot import {module_name}: {error}", file=sys.stderr)
        return 1
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
