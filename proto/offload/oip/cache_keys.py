"""Cache keys: one hash of what decides an answer, for the router's row cache and the cloud's response cache."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from offload.oip.tensors import Tensor, raw_bytes
from offload.oip.types import ParameterValue

DIGEST_BYTES = 20


class KeyHasher:
    """A blake2b hash of a scope, parameters, then tensors (each one's name, datatype, shape and bytes).

    The scope is whatever else the answers depend on (models, versions, requested outputs), in the
    caller's words. Scope and parameters are hashed once; `key` hashes tensors onto a copy of that,
    so one hasher gives the keys of many rows cheaply.
    """

    def __init__(self, scope: str, parameters: Mapping[str, ParameterValue], digest_bytes: int = DIGEST_BYTES) -> None:
        """`digest_bytes`: the length of a key (blake2b's digest size, 1 to 64)."""
        self._prefix = hashlib.blake2b(digest_size=digest_bytes)
        self._prefix.update(f"{scope}\0".encode())
        for name, value in sorted(parameters.items()):
            # The type too: 1, 1.0, True and "1" are different parameters.
            self._prefix.update(f"{name}={type(value).__name__}:{value!r}\0".encode())

    def key(self, tensors: Iterable[Tensor]) -> bytes:
        """The key of the scope, the parameters and these tensors, in the order given."""
        digest = self._prefix.copy()
        for tensor in tensors:
            digest.update(f"{tensor.name}:{tensor.datatype}:{tensor.shape}\0".encode())
            digest.update(raw_bytes(tensor))
        return digest.digest()
