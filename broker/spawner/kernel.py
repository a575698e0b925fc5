"""The kernel interfaces the sandbox needs and Python 3.11's ``os`` lacks, through ``ctypes``.

``unshare``, ``mount``, ``mount_setattr``, ``prctl`` and the three Landlock
system calls, each a thin wrapper that raises ``OSError`` with the errno,
and :func:`landlock_abi` (0 where the kernel has no Landlock). Nothing here
decides anything: :mod:`broker.spawner.sandbox` says what to apply. The
system call numbers of ``mount_setattr`` and Landlock are the same on every
architecture (they were added after the tables were unified).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
SYS_MOUNT_SETATTR = 442

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
CAP_LAST_CAP_FILE = "/proc/sys/kernel/cap_last_cap"

SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
LANDLOCK_RULE_NET_PORT = 2

# file system rights, by the ABI version that added them
FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

FS_READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
#: the rights a rule on a file (not a directory) may grant
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV


def fs_rights(abi: int) -> int:
    """Every file-system right the kernel's Landlock ABI knows."""
    rights = (1 << 13) - 1
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


def _check(result: int) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags))


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode() if source is not None else None,
            target.encode(),
            fstype.encode() if fstype is not None else None,
            flags,
            data.encode() if data is not None else None,
        )
    )


def make_tree_read_only(path: str = "/") -> None:
    """Every mount under ``path`` read-only, in one call (``mount_setattr``, Linux 5.12)."""
    attr = struct.pack("=QQQQ", MOUNT_ATTR_RDONLY, 0, 0, 0)
    buf = ctypes.create_string_buffer(attr, len(attr))
    _check(
        _libc.syscall(
            ctypes.c_long(SYS_MOUNT_SETATTR),
            ctypes.c_int(AT_FDCWD),
            ctypes.c_char_p(path.encode()),
            ctypes.c_uint(AT_RECURSIVE),
            buf,
            ctypes.c_size_t(len(attr)),
        )
    )


def prctl(option: int, arg: int = 0) -> None:
    _check(_libc.prctl(option, arg, 0, 0, 0))


def set_name(name: str) -> None:
    """The process's ``comm`` (what ps and top show), at most 15 bytes."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _check(_libc.prctl(PR_SET_NAME, ctypes.cast(buf, ctypes.c_void_p).value or 0, 0, 0, 0))


def drop_bounding_set() -> None:
    """Clear the capability bounding set (needs CAP_SETPCAP: before leaving root)."""
    try:
        with open(CAP_LAST_CAP_FILE, encoding="ascii") as fh:
            last = int(fh.read())
    except (OSError, ValueError):
        last = 63
    for cap in range(last + 1):
        try:
            prctl(PR_CAPBSET_DROP, cap)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise


# --- Landlock -------------------------------------------------------------------------------


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when it has none (or it is disabled)."""
    try:
        return _check(
            _libc.syscall(
                ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET),
                ctypes.c_void_p(None),
                ctypes.c_size_t(0),
                ctypes.c_uint(LANDLOCK_CREATE_RULESET_VERSION),
            )
        )
    except OSError:
        return 0


class Ruleset:
    """One Landlock ruleset being built; :meth:`restrict` applies it to this thread and its children."""

    def __init__(self, abi: int, fs: int, net: int = 0, scoped: int = 0) -> None:
        if abi >= 6:
            attr = struct.pack("=QQQ", fs, net, scoped)
        elif abi >= 4:
            attr = struct.pack("=QQ", fs, net)
        else:
            attr = struct.pack("=Q", fs)
        buf = ctypes.create_string_buffer(attr, len(attr))
        self.fd = _check(
            _libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), buf, ctypes.c_size_t(len(attr)), ctypes.c_uint(0))
        )

    def allow_beneath(self, path: str, rights: int) -> None:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            rule = struct.pack("=Qi", rights, fd)
            buf = ctypes.create_string_buffer(rule, len(rule))
            _check(
                _libc.syscall(
                    ctypes.c_long(SYS_LANDLOCK_ADD_RULE),
                    ctypes.c_int(self.fd),
                    ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                    buf,
                    ctypes.c_uint(0),
                )
            )
        finally:
            os.close(fd)

    def allow_port(self, port: int, rights: int) -> None:
        rule = struct.pack("=QQ", rights, port)
        buf = ctypes.create_string_buffer(rule, len(rule))
        _check(
            _libc.syscall(
                ctypes.c_long(SYS_LANDLOCK_ADD_RULE),
                ctypes.c_int(self.fd),
                ctypes.c_int(LANDLOCK_RULE_NET_PORT),
                buf,
                ctypes.c_uint(0),
            )
        )

    def restrict(self) -> None:
        """Enforce (no_new_privs must be set first); the descriptor is closed either way."""
        try:
            _check(_libc.syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(self.fd), ctypes.c_uint(0)))
        finally:
            os.close(self.fd)
