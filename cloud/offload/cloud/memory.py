"""The cloud's memory: the default budget for requests in flight, and giving freed memory back.

The budget is sized to what the process may use: the machine's memory, or the cgroup's limit
when the process runs in a container that sets one (a pod's memory limit).

After a burst of large requests, glibc keeps much of the freed memory in its heaps (one per
thread that allocated, up to 8 per core) instead of returning it, so a server that peaked
at gigabytes would stay there. `Trimmer` asks glibc to return it (`malloc_trim`) once large
requests are done and nothing else is in flight, off the event loop. Elsewhere (musl, macOS)
it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import cast

log = logging.getLogger(__name__)

_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
_FALLBACK_MEMORY = 8 << 30  # where the machine's memory cannot be read
# Share of the process's memory that requests in flight may take: their inputs are held about
# twice (the message and its decoded contents) and the rest is models, batches and gRPC.
INFLIGHT_SHARE = 16
# Freed bytes of large requests after which an idle server trims its heaps.
TRIM_AFTER_BYTES = 64 << 20


def process_memory_bytes() -> int:
    """The memory this process may use: the machine's, or its cgroup's limit where that is lower."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = _FALLBACK_MEMORY
    for path in _CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            memory = min(memory, int(text))
    return memory


def default_inflight_bytes() -> int:
    return process_memory_bytes() // INFLIGHT_SHARE


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return cast(Callable[[int], int], trim)


class Trimmer:
    """Returns freed heap memory to the system after large requests, once nothing is in flight."""

    def __init__(self, after_bytes: int = TRIM_AFTER_BYTES) -> None:
        self._trim = _malloc_trim()
        self._after_bytes = after_bytes
        self._freed = 0
        self._lock = threading.Lock()
        self.trims = 0

    def freed(self, nbytes: int, idle: bool) -> None:
        """`nbytes` of request data were let go; `idle`: nothing else is in flight. Call it from a
        worker thread: trimming a large heap takes milliseconds."""
        if self._trim is None:
            return
        with self._lock:
            self._freed += nbytes
            if not idle or self._freed < self._after_bytes:
                return
            self._freed = 0
            self.trims += 1
        self._trim(0)
