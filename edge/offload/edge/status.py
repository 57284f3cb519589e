"""The edge agent's status line: every `status_log_seconds`, one INFO line on how the way to the cloud did.

Circuit transitions are logged the moment they happen (offload.router.resilience);
this line is the steady picture between them, for an operator reading the log of
a device: the circuit's state, the retry tokens left, and since the previous line
the requests, degraded answers and errors, the cloud calls and how many failed or
were kept off the wire, the cache's hit rate and the audit's agreement, and, when recording is on, the
rows recorded, dropped and written and the recording's size on disk. With several cloud replicas it adds
each one's circuit, calls and failed calls, and calls in flight. It is
written only when something happened since the previous one, so an idle device
does not fill its log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, fields

from offload.edge.recording import RecordingStats
from offload.router.stats import ReplicaStats, RouterStats

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Counts:
    """The running totals a line reports the difference of."""

    requests: int = 0
    degraded: int = 0
    errors: int = 0
    cloud_calls: int = 0
    cloud_failures: int = 0
    short_circuited: int = 0
    retries: int = 0
    hedges: int = 0
    circuit_changes: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    audit_rows: int = 0
    recorded: int = 0
    record_dropped: int = 0
    record_written: int = 0
    record_bytes: int = 0

    @classmethod
    def of(cls, stats: RouterStats, recording: RecordingStats | None) -> _Counts:
        cloud, cache = stats.cloud, stats.cache
        return cls(
            requests=stats.requests,
            degraded=stats.degraded,
            errors=stats.errors,
            cloud_calls=cloud.calls if cloud else 0,
            cloud_failures=cloud.failures if cloud else 0,
            short_circuited=cloud.short_circuited if cloud else 0,
            retries=cloud.retries if cloud else 0,
            hedges=cloud.hedges if cloud else 0,
            circuit_changes=cloud.circuit_changes if cloud else 0,
            cache_hits=cache.hits if cache else 0,
            cache_misses=cache.misses if cache else 0,
            audit_rows=stats.audit.rows,
            recorded=recording.rows if recording else 0,
            record_dropped=recording.dropped if recording else 0,
            record_written=recording.rows_written if recording else 0,
            record_bytes=recording.bytes_written if recording else 0,
        )

    def minus(self, other: _Counts) -> _Counts:
        return _Counts(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))


class StatusLog:
    """Writes the agent's status line every `interval_seconds` from the router's `stats` snapshots and,
    when recording is on, the recorder's `recording` ones (clock and sleep injectable for tests)."""

    def __init__(
        self,
        stats: Callable[[], RouterStats],
        interval_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        recording: Callable[[], RecordingStats] | None = None,
    ) -> None:
        self.stats = stats
        self.recording = recording
        self.interval_seconds = interval_seconds
        self._clock = clock
        self._sleep = sleep
        first = stats()
        self._last = _Counts.of(first, recording() if recording else None)
        self._last_at = clock()
        # Each replica's calls and failures at the previous line, by target.
        replicas = first.cloud.replicas if first.cloud is not None else ()
        self._last_replicas = {replica.target: (replica.calls, replica.failures) for replica in replicas}

    def line(self) -> str | None:
        """The status since the previous line, or None if nothing happened since (then the
        next line still covers the time from the previous one)."""
        stats = self.stats()
        recording = self.recording() if self.recording else None
        now = _Counts.of(stats, recording)
        if now == self._last:
            return None
        change = now.minus(self._last)
        elapsed = self._clock() - self._last_at
        self._last, self._last_at = now, self._clock()
        parts = [
            f"status over the last {elapsed:.0f}s: {change.requests} requests "
            f"({change.degraded} degraded, {change.errors} errors)"
        ]
        cloud = stats.cloud
        if cloud is None:
            parts.append("cloud: none")
        else:
            count = change.circuit_changes
            changes = f" ({count} change{'s' if count != 1 else ''})" if count else ""
            parts.append(
                f"cloud {cloud.target}: circuit {cloud.circuit}{changes}, retry tokens {cloud.retry_tokens_text}, "
                f"{change.cloud_calls} calls ({change.cloud_failures} failed, {change.short_circuited} "
                f"short-circuited, {change.retries} retries, {change.hedges} hedges)"
            )
            if [replica.target for replica in cloud.replicas] != [cloud.target]:
                parts.append(self._replicas_part(cloud.replicas))
        if stats.cache is not None:
            lookups = change.cache_hits + change.cache_misses
            if lookups:
                parts.append(
                    f"cache hit rate {100 * change.cache_hits / lookups:.1f}% ({change.cache_hits} of {lookups} rows)"
                )
            else:
                parts.append("cache: no lookups")
        audit = stats.audit
        if audit.agreement is not None:
            parts.append(f"audit agreement {100 * audit.agreement:.1f}% over {audit.rows} rows")
        if recording is not None:
            parts.append(
                f"recording: {change.recorded} rows ({change.record_dropped} dropped), {change.record_written} "
                f"written ({change.record_bytes:,} bytes), {recording.bytes_on_disk:,} bytes on disk"
            )
        return "; ".join(parts)

    def _replicas_part(self, replicas: Sequence[ReplicaStats]) -> str:
        """Each replica's circuit, calls and failed calls since the previous line (RPCs, retries and
        hedges included), calls in flight now, and whether its channel can connect."""
        described = []
        for replica in replicas:
            calls, failures = self._last_replicas.get(replica.target, (0, 0))
            reach = "" if replica.reachable else " unreachable"
            described.append(
                f"{replica.target} {replica.circuit} "
                f"{replica.calls - calls}/{replica.failures - failures}/{replica.outstanding}{reach}"
            )
        self._last_replicas = {replica.target: (replica.calls, replica.failures) for replica in replicas}
        return f"replicas (calls/failed/in flight): {', '.join(described) or 'none known'}"

    def log(self) -> None:
        """Write the line, if anything happened since the previous one."""
        text = self.line()
        if text is not None:
            log.info("%s", text)

    async def run(self) -> None:
        """Write the line every interval, until cancelled."""
        while True:
            await self._sleep(self.interval_seconds)
            self.log()
