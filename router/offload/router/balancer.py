"""Which replica takes the next attempt: least outstanding calls, among those that can take one.

Least outstanding over every replica rather than power of two choices: an edge agent talks to
a handful of GPU replicas, so looking at all of them costs nothing, and its counts are exact (one
event loop sends every call and sees every end), so there is no stale information for several
balancers to herd on, the failure P2C guards against. Outstanding calls are also what makes a
stalled replica lose its traffic before its breaker opens: its calls do not come back, its count
grows, and the others are picked instead.

In order, a replica is preferred when:
1. its breaker lets a call through (others are never picked);
2. its channel can connect: one that cannot (a killed process, a closed port) would fail at once,
   costing a retry token for nothing; it is picked only when no other can take the call, as the
   one endpoint of a pool of one is;
3. this request has not tried it yet, so that a retry or a hedge goes to another replica
   when there is one;
4. it has the fewest calls in flight; ties are broken at random, so idle replicas share the load.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Protocol, TypeVar


class Candidate(Protocol):
    """What the balancer looks at (offload.router.replica.Replica)."""

    @property
    def outstanding(self) -> int: ...

    def ready(self) -> bool: ...

    def reachable(self) -> bool: ...


C = TypeVar("C", bound=Candidate)


def pick(replicas: Sequence[C], tried: Collection[C], rng: random.Random) -> C | None:
    """The replica for the next attempt of a request that has already tried `tried`; None if every
    replica's breaker refuses calls. Asking changes nothing (no probe is taken)."""
    ready = [replica for replica in replicas if replica.ready()]
    if not ready:
        return None

    def rank(replica: C) -> tuple[bool, bool, int]:
        return (not replica.reachable(), replica in tried, replica.outstanding)

    best = min(rank(replica) for replica in ready)
    return rng.choice([replica for replica in ready if rank(replica) == best])
