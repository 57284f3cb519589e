"""A whole-response cache on the cloud, shared by every device that calls one replica (off by default).

Keyed by a hash of the model name and version, every input's name, datatype,
shape and bytes, the requested outputs and the parameters. Bounded in bytes,
least recently used out, entries expire after a TTL. A new model version makes
new keys, so stale answers are never served.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cachetools import TTLCache

from offload.cloud.stats import ResponseCacheStats
from offload.oip.cache_keys import KeyHasher
from offload.oip.datatypes import payload_bytes
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest

_ENTRY_OVERHEAD = 128


class ResponseCache:
    def __init__(self, max_bytes: int, ttl_seconds: float, timer: Callable[[], float] = time.monotonic) -> None:
        self._entries: TTLCache[bytes, list[Tensor]] = TTLCache(
            maxsize=max_bytes, ttl=ttl_seconds, timer=timer, getsizeof=_size
        )
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(request: InferRequest, model_version: str, outputs: list[str]) -> bytes:
        scope = f"{request.model_name}\0{model_version}\0{outputs!r}"
        return KeyHasher(scope, request.parameters).key(sorted(request.inputs, key=lambda t: t.name))

    def stats(self) -> ResponseCacheStats:
        return ResponseCacheStats(
            self.hits, self.misses, int(self._entries.currsize), len(self._entries), self.max_bytes
        )

    def get(self, key: bytes) -> list[Tensor] | None:
        outputs = self._entries.get(key)
        if outputs is None:
            self.misses += 1
        else:
            self.hits += 1
        return outputs

    def put(self, key: bytes, outputs: list[Tensor]) -> None:
        if _size(outputs) <= self.max_bytes:
            self._entries[key] = outputs


def _size(outputs: list[Tensor]) -> int:
    return _ENTRY_OVERHEAD + sum(payload_bytes(tensor.data) for tensor in outputs)
