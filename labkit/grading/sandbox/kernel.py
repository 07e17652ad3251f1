"""Start an IPython kernel for one submission inside limits: `python -m labkit.grading.sandbox.kernel ...`.

Batch grading (`labkit.grading.batch`) launches each learner's kernel through this module. Before the
kernel imports anything it

* starts a new session, so the grader can kill the kernel and every process it forked as one group;
* caps the address space (RLIMIT_AS: allocations beyond it raise MemoryError), core dumps and file sizes;
* on Linux >= 5.13, uses Landlock to forbid writing, creating or deleting files anywhere except the
  submission's scratch directory (and /dev/null, /dev/shm, ...); the limits are inherited by every child.

Reading is not restricted: labkit, jax and the notebooks' imports must stay readable.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import resource
import sys

# Landlock (linux/landlock.h): syscall numbers are the same on every architecture since 5.13.
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38
_WRITE_FILE = 1 << 1
_REMOVE_DIR, _REMOVE_FILE = 1 << 4, 1 << 5
_MAKE_ALL = sum(1 << bit for bit in range(6, 13))  # char, dir, reg, sock, fifo, block, sym
_REFER, _TRUNCATE = 1 << 13, 1 << 14
# Device files the kernel and its libraries legitimately write to; directories get every write right.
_WRITABLE_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty")
_WRITABLE_DEVICE_DIRS = ("/dev/shm", "/dev/pts")
FILE_SIZE_LIMIT = 1 << 30


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, or 0 where Landlock is unavailable."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        return 0
    version = _libc().syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), _CREATE_RULESET_VERSION)
    return max(int(version), 0)


def restrict_writes(writable_dirs: list[str]) -> bool:
    """Forbid this process and its children to write outside `writable_dirs`; False if Landlock is missing."""
    abi = landlock_abi()
    if abi < 1:
        return False
    libc = _libc()
    handled = _WRITE_FILE | _REMOVE_DIR | _REMOVE_FILE | _MAKE_ALL
    handled |= (_REFER if abi >= 2 else 0) | (_TRUNCATE if abi >= 3 else 0)
    file_rights = _WRITE_FILE | (_TRUNCATE if abi >= 3 else 0)
    attr = ctypes.c_uint64(handled)  # struct landlock_ruleset_attr, first field only (ABI 1 size)
    ruleset = libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(8), 0)
    if ruleset < 0:
        return False
    try:
        rules = [(d, handled) for d in list(writable_dirs) + list(_WRITABLE_DEVICE_DIRS)]
        rules += [(f, file_rights) for f in _WRITABLE_DEVICES]
        for path, rights in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                rule = _PathBeneath(rights, fd)
                if libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0) != 0:
                    raise OSError(ctypes.get_errno(), f"landlock_add_rule failed for {path}")
            finally:
                os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if libc.syscall(_SYS_RESTRICT_SELF, ruleset, 0) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    finally:
        os.close(ruleset)
    return True


def apply_limits(memory_bytes: int | None, writable_dirs: list[str]) -> bool:
    """New session, memory/core/file-size limits, write restriction; True if writes are confined."""
    if os.getpid() != os.getpgrp():
        os.setsid()
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
    return restrict_writes(writable_dirs)


def main(argv: list[str] | None = None) -> None:
    """Apply the limits, then run ipykernel with the remaining arguments (`-f CONNECTION_FILE`)."""
    parser = argparse.ArgumentParser(prog="python -m labkit.grading.sandbox.kernel")
    parser.add_argument("--memory", type=int, default=0, help="address-space limit in bytes (0: none)")
    parser.add_argument("--writable", action="append", default=[], help="directory the kernel may write in")
    args, rest = parser.parse_known_args(argv)
    confined = apply_limits(args.memory or None, args.writable)
    os.environ["LABKIT_GRADING_CONFINED"] = "1" if confined else "0"
    from ipykernel import kernelapp

    sys.argv = [sys.argv[0], *rest]
    kernelapp.launch_new_instance()


if __name__ == "__main__":
    main()
