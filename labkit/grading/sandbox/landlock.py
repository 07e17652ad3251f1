"""Landlock (Linux >= 5.13): confine a process and every child it starts to the files it needs.

One ruleset, applied once with `restrict`: writing, creating and deleting files only beneath the writable
directories (and a few device files); reading and executing only beneath the readable paths (with ABI
support: read rules are part of ABI 1); and, where the kernel has Landlock ABI 4 and the caller asks for
it, no TCP connection to any port (the fallback when no network namespace could be made).
"""

from __future__ import annotations

import ctypes
import os
import platform

# linux/landlock.h: the syscall numbers are the same on every architecture since 5.13.
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH, _RULE_NET_PORT = 1, 2
_PR_SET_NO_NEW_PRIVS = 38
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_REMOVE_DIR, _REMOVE_FILE = 1 << 4, 1 << 5
_MAKE_ALL = sum(1 << bit for bit in range(6, 13))  # char, dir, reg, sock, fifo, block, sym
_REFER, _TRUNCATE = 1 << 13, 1 << 14
_NET_CONNECT_TCP = 1 << 1
_READ_RIGHTS = EXECUTE | READ_FILE | READ_DIR
# Device files the kernel and its libraries legitimately write to; directories get every write right.
_WRITABLE_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty")
_WRITABLE_DEVICE_DIRS = ("/dev/shm", "/dev/pts")


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def abi() -> int:
    """The kernel's Landlock ABI version, or 0 where Landlock is unavailable."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        return 0
    version = _libc().syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), _CREATE_RULESET_VERSION)
    return max(int(version), 0)


def _add_path_rule(libc: ctypes.CDLL, ruleset: int, path: str, rights: int) -> None:
    """Allow `rights` beneath `path` (file rights only for a file); a missing path is skipped."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if not os.path.isdir(path):
            rights &= EXECUTE | WRITE_FILE | READ_FILE | _TRUNCATE
        rule = _PathBeneath(rights, fd)
        if libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule failed for {path}")
    finally:
        os.close(fd)


def restrict(writable: list[str], readable: list[str] | None, *, block_tcp: bool = False) -> dict[str, bool]:
    """Confine this process and its future children; says which of writes, reads and tcp are confined.

    `readable=None` leaves reading unrestricted; otherwise reads (and execution) are allowed only beneath
    `readable` and `writable`. `block_tcp` forbids every TCP connect where the kernel can (ABI >= 4).
    """
    version = abi()
    if version < 1:
        return {"writes": False, "reads": False, "tcp": False}
    libc = _libc()
    writes = WRITE_FILE | _REMOVE_DIR | _REMOVE_FILE | _MAKE_ALL
    writes |= (_REFER if version >= 2 else 0) | (_TRUNCATE if version >= 3 else 0)
    handled = writes | (_READ_RIGHTS if readable is not None else 0)
    net = _NET_CONNECT_TCP if block_tcp and version >= 4 else 0
    attr = _RulesetAttr(handled, net)
    size = ctypes.sizeof(_RulesetAttr) if net else 8  # ABI 1-3 kernels know only the first field
    ruleset = libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0)
    if ruleset < 0:
        return {"writes": False, "reads": False, "tcp": False}
    try:
        for path in list(writable) + list(_WRITABLE_DEVICE_DIRS):
            _add_path_rule(libc, ruleset, path, handled)
        for path in _WRITABLE_DEVICES:
            _add_path_rule(libc, ruleset, path, WRITE_FILE | READ_FILE | (_TRUNCATE if version >= 3 else 0))
        for path in readable or []:
            _add_path_rule(libc, ruleset, path, _READ_RIGHTS)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if libc.syscall(_SYS_RESTRICT_SELF, ruleset, 0) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    finally:
        os.close(ruleset)
    return {"writes": True, "reads": readable is not None, "tcp": bool(net)}
