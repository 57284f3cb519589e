"""Policies that keep a struggling cloud from being drowned: a retry budget and a circuit breaker.

Both take an injectable clock, so tests drive time instead of sleeping.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class RetryThrottle:
    """gRPC's retry throttling (proposal A6): one token bucket per cloud, shared by all calls.

    Each failed attempt (a retryable status) takes a token, each success returns
    `token_ratio` of one. Retries and hedges are allowed only while more than half
    the tokens remain, so when the cloud fails steadily, extra traffic from retries
    stops after about max_tokens / 2 failures instead of multiplying the load.
    """

    def __init__(self, max_tokens: float = 10.0, token_ratio: float = 0.1) -> None:
        if max_tokens <= 0 or token_ratio <= 0:
            raise ValueError("max_tokens and token_ratio must be positive")
        self.max_tokens = max_tokens
        self.token_ratio = token_ratio
        self.tokens = max_tokens

    def record_failure(self) -> None:
        self.tokens = max(0.0, self.tokens - 1.0)

    def record_success(self) -> None:
        self.tokens = min(self.max_tokens, self.tokens + self.token_ratio)

    def allows_retry(self) -> bool:
        return self.tokens > self.max_tokens / 2


class BreakerState(StrEnum):
    CLOSED = "closed"  # calls flow
    OPEN = "open"  # calls are refused at once; rows are answered on the edge
    HALF_OPEN = "half_open"  # one probe call decides


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    consecutive_failures: int = 5
    # Or: this share of failures among the last `window` calls (once `min_calls` were seen).
    failure_rate: float = 0.5
    window: int = 20
    min_calls: int = 10
    cooldown_seconds: float = 5.0


class CircuitBreaker:
    """Per-endpoint breaker: open on consecutive failures or a failure rate, probe after a cool-down."""

    def __init__(
        self,
        name: str,
        policy: BreakerPolicy | None = None,
        clock: Clock = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self.name = name
        self.policy = policy or BreakerPolicy()
        self._clock = clock
        self._on_change = on_change
        self.state = BreakerState.CLOSED
        self._consecutive = 0
        self._recent: collections.deque[bool] = collections.deque(maxlen=self.policy.window)
        self._opened_at = 0.0
        self._probe_in_flight = False
        self._probes = 0  # half-open probes let through so far (numbers them)

    def allow(self) -> bool:
        """Whether a call may go out now (in HALF_OPEN: only the one probe)."""
        if self.state is BreakerState.OPEN:
            if self._clock() - self._opened_at < self.policy.cooldown_seconds:
                return False
            self._set(BreakerState.HALF_OPEN)
        if self.state is BreakerState.HALF_OPEN:
            if self._probe_in_flight:
                return False
            self._probe_in_flight = True
            self._probes += 1
        return True

    @property
    def probes(self) -> int:
        """How many half-open probes were let through: the number of the latest."""
        return self._probes

    def abandon_probe(self, probe: int) -> None:
        """Probe number `probe` ended with no outcome (its call was cancelled, or gave up before
        sending): the next call may probe. Without this the breaker would wait for it forever."""
        if self._probe_in_flight and probe == self._probes:
            self._probe_in_flight = False

    def record_success(self) -> None:
        self._consecutive = 0
        self._recent.append(True)
        self._probe_in_flight = False
        if self.state is not BreakerState.CLOSED:
            self._recent.clear()
            self._set(BreakerState.CLOSED)

    def record_failure(self) -> None:
        self._consecutive += 1
        self._recent.append(False)
        self._probe_in_flight = False
        if self.state is BreakerState.HALF_OPEN or self._tripped():
            self._opened_at = self._clock()
            self._set(BreakerState.OPEN)

    def _tripped(self) -> bool:
        if self._consecutive >= self.policy.consecutive_failures:
            return True
        if len(self._recent) < self.policy.min_calls:
            return False
        failures = sum(1 for ok in self._recent if not ok)
        return failures / len(self._recent) >= self.policy.failure_rate

    def _set(self, state: BreakerState) -> None:
        if state is self.state:
            return
        previous, self.state = self.state, state
        if state is BreakerState.OPEN:
            log.warning(
                "cloud %s: circuit %s -> open after repeated failures; answering on the edge for %.1fs, then probing",
                self.name,
                previous,
                self.policy.cooldown_seconds,
            )
        else:
            log.info("cloud %s: circuit %s -> %s", self.name, previous, state)
        if self._on_change is not None:
            self._on_change(state)
