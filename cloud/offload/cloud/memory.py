"""The cloud's memory: the default bounds for requests in flight, and giving freed memory back.

The defaults for requests in flight and for concurrent RPCs are sized to what the process may use:
the machine's memory, or the cgroup's limit when the process runs in a container that sets one (a
pod's memory limit).

After a burst of large requests, glibc keeps much of the freed memory in its heaps (one per
thread that allocated, up to 8 per core: gRPC's threads read the bodies, the event loop
decodes them, the model threads run them) instead of returning it, so a server that peaked
at gigabytes would stay there. `Trimmer` gives it back (offload.oip.memory, the servers' one
mechanism for it) as large requests are let go, in a thread of its own.
`freeze_startup_objects` makes the full garbage collections it runs cheap.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from pathlib import Path

from offload.oip.memory import give_back_freed_memory

log = logging.getLogger(__name__)

_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
_FALLBACK_MEMORY = 8 << 30  # where the machine's memory cannot be read
# Share of the process's memory that requests in flight may take: their inputs are held about
# twice (the message and its decoded contents) and the rest is models, batches and gRPC.
INFLIGHT_SHARE = 16
# Share of the process's memory that request bodies being read may take (the cap on concurrent RPCs
# times the largest message), and the fewest concurrent RPCs a cloud serves by default: twice the
# 64 concurrent callers it is measured with, since a finished RPC leaves the count a moment after
# its caller has its answer and sends the next.
BODIES_SHARE = 8
MIN_CONCURRENT_RPCS = 128
# Bytes of requests let go after which memory is given back: a trim (a collection of what requests
# left, which the frozen start-up objects make cheap, and malloc_trim: milliseconds) is rare next
# to the requests it follows, and at most one runs every TRIM_INTERVAL_SECONDS.
TRIM_AFTER_BYTES = 32 << 20
TRIM_INTERVAL_SECONDS = 0.2
# When nothing is in flight any more, less than that is enough; and the answers are still being
# encoded and sent then, so memory is given back once more this much later.
IDLE_TRIM_BYTES = 1 << 20
SETTLE_SECONDS = 1.0


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


def default_concurrent_rpcs(max_message_bytes: int) -> int:
    """RPCs whose bodies (of up to `max_message_bytes`) fit in a share of the memory; never fewer than
    MIN_CONCURRENT_RPCS, so that many small concurrent calls are not refused on a small machine."""
    return max(MIN_CONCURRENT_RPCS, process_memory_bytes() // BODIES_SHARE // max_message_bytes)


def freeze_startup_objects() -> None:
    """Move every object alive now (modules, models) out of the garbage collector's sight: they live
    as long as the process, and a full collection then looks only at what requests made (about half
    a second with torch loaded, down to microseconds)."""
    gc.collect()
    gc.freeze()


class Trimmer:
    """Returns freed memory to the system after large requests are let go (answered, failed, dropped
    or refused): once `after_bytes` of them have been (a megabyte, when nothing is in flight any more),
    a thread of its own collects Python's cyclic garbage (a cancelled call can leave its message in a
    cycle until the next full collection) and trims glibc's heaps, at most once every `interval`
    seconds, so that neither the event loop nor a model instance waits for it."""

    def __init__(self, after_bytes: int = TRIM_AFTER_BYTES, interval: float = TRIM_INTERVAL_SECONDS) -> None:
        self._after_bytes = after_bytes
        self._interval = interval
        self._freed = 0
        self._due = threading.Event()
        self._thread: threading.Thread | None = None
        self._settle = False  # trim once more after the last answers of a burst are sent
        self._lock = threading.Lock()
        self.trims = 0

    def freed(self, nbytes: int, idle: bool) -> None:
        """`nbytes` of request data were let go; `idle`: nothing is in flight any more, so what was freed
        since the last trim is given back now, however little (a burst's tail), and once more a moment
        later, after the last answers have been sent."""
        with self._lock:
            self._freed += nbytes
            if self._freed < (min(self._after_bytes, IDLE_TRIM_BYTES) if idle else self._after_bytes):
                return
            self._freed = 0
            self._settle = self._settle or idle
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cloud-memory-trim", daemon=True)
                self._thread.start()
        self._due.set()

    def _run(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            self._give_back()
            time.sleep(self._interval)  # what is freed meanwhile waits for the next trim
            with self._lock:
                settle, self._settle = self._settle, False
            if settle:
                time.sleep(SETTLE_SECONDS)
                self._give_back()

    def _give_back(self) -> None:
        gc.collect()
        give_back_freed_memory()
        self.trims += 1
        log.debug("returned freed memory to the system (trim %d)", self.trims)
