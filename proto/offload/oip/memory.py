"""The C allocator: keep a server's resident memory to what it uses (for devices, where memory is short).

glibc's malloc, the C allocator of most Linux systems, keeps what a program frees for reuse rather
than give it back, and gives threads that allocate at the same time arenas of their own (up to
eight per core), each keeping its own. After each large request the edge agent's resident memory
crept up by tens of megabytes though nothing was in use. So a server can cap the arenas
(`limit_arenas`) and, once a large call has ended, ask malloc to give its free pages back
(`give_back_freed_memory`, malloc_trim: a few milliseconds). Elsewhere (musl, macOS) both are no-ops.
"""

from __future__ import annotations

import ctypes
import logging
import platform
from functools import cache

log = logging.getLogger(__name__)

# mallopt's parameter number for the most arenas (glibc's malloc.h).
_M_ARENA_MAX = -8


@cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL("libc.so.6")


def limit_arenas(arenas: int) -> None:
    """Cap malloc's arenas (call it early: arenas made before stay)."""
    libc = _glibc()
    if libc is not None and not libc.mallopt(_M_ARENA_MAX, arenas):
        log.warning("mallopt(M_ARENA_MAX, %d) failed; memory freed on many threads may stay resident", arenas)


def give_back_freed_memory() -> None:
    """Return the pages malloc holds free to the system (blocking: call it off the event loop)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
