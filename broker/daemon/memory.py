"""The daemon's memory and descriptors: what a burst of large answers took goes back afterwards.

glibc raises its mmap threshold after the first large block is freed, so
later large answers (a 1 MB result, its encoded frame) come from the heap
and stay there after they are freed: a burst of them left the daemon
hundreds of MiB larger for good. :func:`bound` fixes the threshold (every
block over 128 KiB gets its own mapping, returned when freed) and keeps to
two malloc arenas (the executor's threads would each get one).

Most of what a dropped caller leaves is cyclic garbage: the exception that
ended its connection holds the frames that held its answers, so a burst of
stuck sessions kept ~1 MB per session alive until a full collection, which
an idle daemon may not run for a long time (measured with ``make bench``'s
hostile-neighbour phase: +13 MiB per stuck cycle, all of it back after a
``gc.collect()``). :func:`settle` freezes what start-up made (modules,
classes: never garbage), so that :func:`trim`, which the daemon calls every
few seconds, collects in a few milliseconds instead of ~80, and then hands
free heap pages back. The descriptor limit is raised to the hard limit: quotas
(``max_connections``), not the kernel's soft default, bound what callers
hold. Standard library only; without glibc each step is skipped.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import resource
from typing import Any

#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8

_libc: Any = None


def _c() -> Any:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.mallopt  # noqa: B018 - glibc, or not
            _libc.malloc_trim  # noqa: B018
        except (OSError, AttributeError):
            _libc = False
    return _libc


def bound() -> None:
    """Fixed mmap threshold, two arenas, descriptors up to the hard limit (at start, before serving)."""
    libc = _c()
    if libc:
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 1024 * 1024)
        libc.mallopt(_M_ARENA_MAX, 2)
    with contextlib.suppress(OSError, ValueError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def settle() -> None:
    """Once serving: what start-up made is never collected again, so each collection scans only newer objects."""
    gc.collect()
    gc.freeze()


def trim() -> None:
    """Collect cyclic garbage, then return free heap pages to the system (milliseconds after :func:`settle`)."""
    gc.collect()
    libc = _c()
    if libc:
        libc.malloc_trim(0)


__all__ = ["bound", "settle", "trim"]
