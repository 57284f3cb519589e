"""Cloud answers cached per row, with single-flight: a row is never sent twice at once.

The key of a row is a hash of everything that can change the cloud's answer for
it: the edge and cloud model names and versions, every input's name, datatype,
row shape and row bytes, and the parameters forwarded to the cloud. Requested
outputs are not in it because the router always asks the cloud for every
output and filters afterwards.

Entries live in a cachetools TTLCache: least recently used first out, expiring
after a TTL, bounded in bytes. The bound is on memory, not on payload: each
entry is charged what it really takes (its key, the cache's links and table
slots, its dict and arrays, their shape blocks and BYTES elements), and holds
its own copy of its row, so it never keeps a whole cloud response alive. When
the cloud reports a new version of a model, that model's entries are dropped.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from cachetools import TTLCache

from offload.oip.cache_keys import KeyHasher
from offload.oip.tensors import Tensor
from offload.oip.types import ParameterValue
from offload.router.stats import CacheStats

RowOutputs = dict[str, npt.NDArray[Any]]  # output name -> that row's values (no batch dimension)
_KEY_BYTES = 16
# What the cache's own structures take per entry, measured with tracemalloc (CPython 3.11, cachetools 8;
# tests/test_cache.py holds the charge to the measurement): the key (a 16-byte bytes object), the entry
# tuple, the entry's size (an int), cachetools' LRU link and its expiry (a float), and a slot in each of
# its hash tables (the values, the sizes and the links: an OrderedDict, which has two). Tables double
# when full, so a slot's share swings by 2x: about 460 bytes just after a doubling, the worst case.
_BOOKKEEPING = 480


class FetchAbandoned(Exception):
    """The request that was fetching a row gave up on its own account (its deadline ran out or its
    caller went away): the cloud did not fail, so a waiter with time left fetches the row itself."""


@dataclass(slots=True)
class _Counts:
    """Live counters; stats() hands out a frozen copy with the cache's size."""

    hits: int = 0
    misses: int = 0
    shared: int = 0  # rows that waited for another request's cloud call (single-flight)
    invalidations: int = 0


@dataclass(frozen=True, slots=True)
class RowPlan:
    """How each row of a cloud-bound batch gets its answer."""

    keys: list[bytes]
    hits: dict[int, RowOutputs]  # position -> cached answer
    waits: dict[int, asyncio.Future[RowOutputs]]  # position -> another call's answer
    sends: list[int]  # positions this request must send (first occurrence of each key)
    duplicates: dict[int, int] = field(default_factory=dict)  # position -> position of the same key in sends


class _CountingTTLCache(TTLCache[bytes, tuple[str, RowOutputs]]):
    """A TTLCache that counts what it drops on its own: to make room, and at the end of an entry's TTL."""

    evicted = 0
    expired = 0

    def popitem(self) -> tuple[bytes, tuple[str, RowOutputs]]:
        # TTLCache calls this (and only then) to make room for a new entry.
        item = super().popitem()
        self.evicted += 1
        return item

    def expire(self, time: float | None = None) -> list[tuple[bytes, tuple[str, RowOutputs]]]:
        expired = list(super().expire(time))
        self.expired += len(expired)
        return expired


class RowCache:
    def __init__(self, max_bytes: int, ttl_seconds: float, timer: Callable[[], float] = time.monotonic) -> None:
        self._entries = _CountingTTLCache(maxsize=max_bytes, ttl=ttl_seconds, timer=timer, getsizeof=_entry_size)
        self._in_flight: dict[bytes, asyncio.Future[RowOutputs]] = {}
        # The cloud version last seen per (edge model, cloud model): a change drops the model's entries.
        self._cloud_versions: dict[str, str] = {}
        self.max_bytes = max_bytes
        self._counts = _Counts()

    @property
    def bytes_used(self) -> int:
        return int(self._entries.currsize)

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> CacheStats:
        counts = self._counts
        return CacheStats(
            hits=counts.hits,
            misses=counts.misses,
            shared=counts.shared,
            invalidations=counts.invalidations,
            bytes=self.bytes_used,
            entries=len(self),
            max_bytes=self.max_bytes,
            evicted=self._entries.evicted,
            expired=self._entries.expired,
        )

    def keys(
        self,
        scope: str,
        inputs: Sequence[Tensor],
        parameters: Mapping[str, ParameterValue],
    ) -> list[bytes]:
        """One key per row; `scope` names the models and their versions."""
        hasher = KeyHasher(scope, parameters, digest_bytes=_KEY_BYTES)
        rows = inputs[0].shape[0] if inputs else 0
        # The digest covers the scope, so it is the whole key: every key is the same 16 bytes.
        return [hasher.key(Tensor(t.name, t.datatype, t.data[row : row + 1]) for t in inputs) for row in range(rows)]

    def plan(self, keys: list[bytes]) -> RowPlan:
        """Look every row up; claim the rows nobody is fetching, so identical ones wait for them."""
        plan = RowPlan(keys=keys, hits={}, waits={}, sends=[])
        first_send: dict[bytes, int] = {}
        loop = asyncio.get_running_loop()
        for position, key in enumerate(keys):
            cached = self._entries.get(key)
            if cached is not None:
                plan.hits[position] = cached[1]
                self._counts.hits += 1
            elif key in first_send:
                plan.duplicates[position] = first_send[key]
            elif key in self._in_flight:
                plan.waits[position] = self._in_flight[key]
                self._counts.shared += 1
            else:
                self._in_flight[key] = loop.create_future()
                first_send[key] = position
                plan.sends.append(position)
                self._counts.misses += 1
        return plan

    def fulfil(self, plan: RowPlan, model: str, cloud_version: str, answers: Sequence[RowOutputs]) -> None:
        """Store the answers of the sent rows and wake whoever waits for them."""
        if self._cloud_versions.get(model, cloud_version) != cloud_version:
            self.invalidate(model)
        self._cloud_versions[model] = cloud_version
        for position, answer in zip(plan.sends, answers, strict=True):
            key = plan.keys[position]
            entry = (model, {name: _own_copy(values) for name, values in answer.items()})
            if _entry_size(entry) <= self.max_bytes:
                self._entries[key] = entry
            self._release(key, answer, None)

    def fail(self, plan: RowPlan, error: BaseException) -> None:
        """The call for the sent rows failed: waiters get the same failure (FetchAbandoned when the
        sender gave up on its own account, so that they fetch the rows themselves)."""
        for position in plan.sends:
            self._release(plan.keys[position], None, error)

    def _release(self, key: bytes, answer: RowOutputs | None, error: BaseException | None) -> None:
        future = self._in_flight.pop(key, None)
        if future is None or future.done():
            return
        if error is not None:
            future.set_exception(error)
            # Nobody may be waiting; mark the exception as seen so asyncio does not warn.
            future.exception()
        else:
            assert answer is not None
            future.set_result(answer)

    def invalidate(self, model: str) -> None:
        """Drop every entry of a model (its edge or cloud version changed)."""
        stale = [key for key, (owner, _) in self._entries.items() if owner == model]
        for key in stale:
            del self._entries[key]
        self._counts.invalidations += 1


def _own_copy(values: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """A row's values in memory of their own, read-only (hits hand them out): a row of a cloud answer is
    a view of the whole answer, and caching the view would keep the answer alive for as long as the row."""
    copy = np.array(values, copy=True)
    copy.flags.writeable = False
    return copy


def _entry_size(entry: tuple[str, RowOutputs]) -> int:
    """The memory an entry takes, what the byte bound counts: the cache's bookkeeping, the entry's dict, its
    arrays. The model name is not counted: every entry of a model shares the one string."""
    outputs = entry[1]
    return _BOOKKEEPING + _allocated(sys.getsizeof(outputs)) + sum(_array_size(array) for array in outputs.values())


def _array_size(array: npt.NDArray[Any]) -> int:
    """An array that owns its data: its object, its shape and strides (one block), its data, and for
    BYTES each element's bytes object."""
    header = sys.getsizeof(array) - (array.nbytes if array.flags.owndata else 0)
    size = _allocated(header) + _allocated(array.nbytes)
    if array.ndim:
        size += _allocated(2 * array.ndim * np.dtype(np.intp).itemsize)
    if array.dtype == np.dtype(object):
        size += sum(_allocated(sys.getsizeof(item)) for item in array.ravel().tolist())
    return size


def _allocated(requested: int) -> int:
    """What malloc gives for a request: an 8-byte header, rounded up to 16 bytes, 32 at least."""
    return max(32, (requested + 8 + 15) // 16 * 16)
