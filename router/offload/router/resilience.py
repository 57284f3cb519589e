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


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """The size of a RetryThrottle's bucket, and the share of a token each success gives back."""

    max_tokens: float = 10.0
    token_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.max_tokens <= 0 or self.token_ratio <= 0:
            raise ValueError("max_tokens and token_ratio must be positive")


class RetryThrottle:
    """gRPC's retry throttling (proposal A6): one token bucket per cloud, shared by all calls
    (to every replica of it: a pool of replicas is one cloud, with one budget).

    Each failed attempt (a retryable status, or a pushback that forbids retrying)
    takes a token, each success returns `token_ratio` of one; other statuses leave
    the count alone. Retries and hedges are allowed only while more than half the
    tokens remain, so when the cloud fails steadily, extra traffic from retries
    stops after about max_tokens / 2 failures instead of multiplying the load.

    A hedge also takes a token when it is sent (`take_for_hedge`), whatever its
    outcome. A6 throttles hedges with this same bucket; charging each one keeps
    the extra load they cause bounded by what the budget refills: with the
    default ratio 0.1, at most about one hedge per ten successful calls once the
    first half of the bucket is spent. Without the charge a slow but healthy cloud,
    whose every call succeeds, would get every call twice, forever.
    """

    def __init__(self, budget: RetryBudget | None = None) -> None:
        budget = budget or RetryBudget()
        self.max_tokens = budget.max_tokens
        self.token_ratio = budget.token_ratio
        self.tokens = budget.max_tokens

    def record_failure(self) -> None:
        self.tokens = max(0.0, self.tokens - 1.0)

    def record_success(self) -> None:
        self.tokens = min(self.max_tokens, self.tokens + self.token_ratio)

    def allows_retry(self) -> bool:
        return self.tokens > self.max_tokens / 2

    def take_for_hedge(self) -> bool:
        """Take a token for a hedge if the budget allows one; False (nothing taken) if not."""
        if not self.allows_retry():
            return False
        self.tokens = max(0.0, self.tokens - 1.0)
        return True


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
    """Per-replica breaker: open on consecutive failures or a failure rate, probe after a cool-down.

    Every transition is logged with its reason (WARNING when it opens, INFO otherwise),
    followed by `describe()` when given (the pool adds its retry-token count).
    """

    def __init__(
        self,
        name: str,
        policy: BreakerPolicy | None = None,
        clock: Clock = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
        describe: Callable[[], str] | None = None,
    ) -> None:
        self.name = name
        self.policy = policy or BreakerPolicy()
        self._clock = clock
        self._on_change = on_change
        self._describe = describe
        self.state = BreakerState.CLOSED
        self._consecutive = 0
        self._recent: collections.deque[bool] = collections.deque(maxlen=self.policy.window)
        self._opened_at = 0.0
        self._probe_in_flight = False
        self._probes = 0  # half-open probes let through so far (numbers them)
        self.transitions = 0  # state changes so far (the agent's status line reports them)

    def ready(self) -> bool:
        """Whether allow() would let a call go out now, without letting one: no state changes and no
        probe is taken (a pool asks this of every replica before it picks one)."""
        if self.state is BreakerState.OPEN:
            return self._clock() - self._opened_at >= self.policy.cooldown_seconds
        if self.state is BreakerState.HALF_OPEN:
            return not self._probe_in_flight
        return True

    def allow(self) -> bool:
        """Whether a call may go out now (in HALF_OPEN: only the one probe), counting it as that probe."""
        if not self.ready():
            return False
        if self.state is BreakerState.OPEN:
            self._set(
                BreakerState.HALF_OPEN,
                f"the {self.policy.cooldown_seconds:g}s cool-down is over; letting one probe call through",
            )
        if self.state is BreakerState.HALF_OPEN:
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
            reason = (
                "the probe call succeeded"
                if self.state is BreakerState.HALF_OPEN
                else "a call sent before it opened succeeded"
            )
            self._recent.clear()
            self._set(BreakerState.CLOSED, reason)

    def record_failure(self, cause: str = "failure") -> None:
        """A call failed; `cause` (e.g. the status name) goes into the log line if this opens the breaker."""
        self._consecutive += 1
        self._recent.append(False)
        self._probe_in_flight = False
        reason = f"the probe call failed ({cause})" if self.state is BreakerState.HALF_OPEN else self._tripped(cause)
        if reason is None:
            return
        self._opened_at = self._clock()
        self._set(
            BreakerState.OPEN,
            f"{reason}; answering on the edge for {self.policy.cooldown_seconds:g}s, then one probe call",
        )

    def _tripped(self, cause: str) -> str | None:
        """Why the breaker must open now, or None if it need not."""
        if self._consecutive >= self.policy.consecutive_failures:
            return f"{self._consecutive} consecutive failures (last: {cause})"
        if len(self._recent) < self.policy.min_calls:
            return None
        failures = sum(1 for ok in self._recent if not ok)
        if failures / len(self._recent) >= self.policy.failure_rate:
            return f"{failures} of the last {len(self._recent)} calls failed (last: {cause})"
        return None

    def _set(self, state: BreakerState, reason: str) -> None:
        if state is self.state:
            return
        previous, self.state = self.state, state
        self.transitions += 1
        context = f"; {self._describe()}" if self._describe is not None else ""
        level = logging.WARNING if state is BreakerState.OPEN else logging.INFO
        log.log(level, "cloud %s: circuit %s -> %s: %s%s", self.name, previous, state, reason, context)
        if self._on_change is not None:
            self._on_change(state)
