"""Where the cloud's replicas are: the `--cloud` value parsed, and the live set of replicas it names.

`--cloud` (EdgeSettings.cloud) is one target or several, separated by commas:

- HOST:PORT (an IPv4 address, an IPv6 address in brackets, or a DNS name; offload.oip.address):
  one replica on its own channel. gRPC resolves a name itself and connects to the first of its
  addresses that answers, as with a single cloud.
- dns:///NAME:PORT: one replica for every address NAME resolves to (all its A and AAAA
  records), looked up again every `resolve_seconds`: what a headless Kubernetes Service gives.

Why the pool looks DNS names up itself and opens one channel per address, rather than handing
dns:///NAME:PORT to one gRPC channel with the round_robin policy (which re-resolves on its own):
such a channel balances inside gRPC, where nothing tells which replica a call went to, and the
pool needs to know that for everything it does per replica: a circuit breaker each, outstanding
calls to balance on, a retry or a hedge sent to another replica, figures in the stats. The
addresses come from the system resolver (getaddrinfo), where gRPC's native resolver gets them.
A new lookup adds the replicas that appeared and retires those that are gone, letting their calls
in flight finish. A lookup that fails or finds no address keeps the replicas known (as gRPC
does: a DNS hiccup must not empty the pool) and is tried again after RETRY_LOOKUP_SECONDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from offload.oip.address import check_address
from offload.router.replica import Replica

log = logging.getLogger(__name__)

DNS_SCHEME = "dns:"
USAGE = "give HOST:PORT, several separated by commas, or dns:///NAME:PORT for every address of NAME"
# How soon a lookup that failed or found nothing is tried again (a successful one waits resolve_seconds).
RETRY_LOOKUP_SECONDS = 1.0

Resolver = Callable[[str, int], Awaitable[list[str]]]


@dataclass(frozen=True, slots=True)
class DnsName:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{DNS_SCHEME}///{address(self.host, self.port)}"


@dataclass(frozen=True, slots=True)
class CloudTargets:
    """The `--cloud` value: fixed addresses (one replica each) and DNS names (a replica per address)."""

    addresses: tuple[str, ...]
    names: tuple[DnsName, ...]

    @classmethod
    def parse(cls, text: str) -> CloudTargets:
        """Raises ValueError, naming the entry and what is expected, for a value that is not one."""
        entries = [entry.strip() for entry in text.split(",")]
        if not all(entries):
            raise ValueError(f"cloud {text!r} has an empty entry; {USAGE}")
        duplicates = sorted({entry for entry in entries if entries.count(entry) > 1})
        if duplicates:
            raise ValueError(f"cloud {text!r} lists {duplicates[0]!r} more than once")
        # check_address returns a good entry unchanged; its ValueError names the entry and what is wrong.
        addresses = tuple(check_address(entry) for entry in entries if not entry.startswith(DNS_SCHEME))
        names = tuple(_dns_name(entry) for entry in entries if entry.startswith(DNS_SCHEME))
        return cls(addresses, names)


def _dns_name(entry: str) -> DnsName:
    rest = entry.removeprefix(DNS_SCHEME)
    if rest.startswith("//"):
        authority, slash, rest = rest[2:].partition("/")
        if not slash:
            raise ValueError(f"cloud entry {entry!r}: write dns:///NAME:PORT (three slashes)")
        if authority:
            raise ValueError(
                f"cloud entry {entry!r}: a DNS server in the target is not supported (the system resolver is "
                "used); write dns:///NAME:PORT"
            )
    try:
        check_address(rest)
    except ValueError as exc:
        raise ValueError(f"cloud entry {entry!r}: dns:///NAME:PORT needs a name and a port: {exc}") from None
    host, _, port = rest.rpartition(":")
    return DnsName(host.removeprefix("[").removesuffix("]"), int(port))


def address(host: str, port: int) -> str:
    """HOST:PORT as a gRPC target, brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def lookup(host: str, port: int) -> list[str]:
    """Every address of `host` (A and AAAA records) as gRPC targets, sorted; OSError if the lookup fails."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({address(str(info[4][0]), port) for info in infos})


class ReplicaSet:
    """The pool's replicas now: the fixed addresses, and the current addresses of the DNS names.

    The names are looked up by a background task, from the moment there is an event loop (at
    once if this is made inside one, else at the first call), every `resolve_seconds`, or every
    RETRY_LOOKUP_SECONDS while a name has no address: it keeps going when no call comes (an agent
    whose cloud is unhealthy still learns of new replicas).

    `make(address, name)` makes the replica at `address`: a fixed one (name None), or one a lookup of
    `name` found, whose TLS certificate is then checked against `name`, not against the address.
    """

    def __init__(
        self,
        targets: CloudTargets,
        make: Callable[[str, str | None], Replica],
        resolve_seconds: float,
        retire_grace_seconds: float,
        on_change: Callable[[], None],
        resolver: Resolver = lookup,
    ) -> None:
        self._make = make
        self._resolve_seconds = resolve_seconds
        self._retire_grace_seconds = retire_grace_seconds
        self._on_change = on_change
        self._resolver = resolver
        self._fixed = [make(target, None) for target in targets.addresses]
        self._names = targets.names
        self._found: dict[DnsName, list[str]] = {}  # each name's addresses, as last found
        self._resolved: dict[str, Replica] = {}  # the replicas at those addresses
        self._looked_up = asyncio.Event()  # the first lookup of the names has ended
        self._lookups: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self.replicas: list[Replica] = list(self._fixed)
        if not self._names:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # made outside an event loop (an app's router before asyncio.run): the first call starts them
        self._start_lookups()

    async def current(self, timeout: float) -> list[Replica]:
        """The replicas now; before the first lookup of the names has ended, waits for it, at most
        `timeout` seconds (a slow DNS server must not hold a request past its deadline)."""
        if self._names:
            self._start_lookups()
            if not self._looked_up.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._looked_up.wait(), max(timeout, 0.0))
        return self.replicas

    async def close(self) -> None:
        if self._lookups is not None:
            self._lookups.cancel()
            await asyncio.gather(self._lookups, return_exceptions=True)
        await asyncio.gather(*self._retiring, *(replica.close() for replica in self.replicas))

    def _start_lookups(self) -> None:
        if self._lookups is None or self._lookups.done():  # done: it failed, so start over
            self._lookups = asyncio.create_task(self._keep_looking_up())

    async def _keep_looking_up(self) -> None:
        while True:
            complete = await self._look_up()
            self._looked_up.set()
            self._on_change()
            await asyncio.sleep(self._resolve_seconds if complete else RETRY_LOOKUP_SECONDS)  # the lookup period

    async def _look_up(self) -> bool:
        """Look every name up and update the replicas; False if a name had no address."""
        missing: list[str] = []
        for name in self._names:
            try:
                found = await self._resolver(name.host, name.port)
            except (OSError, UnicodeError) as exc:  # UnicodeError: a name IDNA cannot encode
                missing.append(f"{name} ({exc})")
                continue
            if found:
                self._found[name] = found
            else:
                missing.append(f"{name} (no address)")
        if missing:
            log.warning(
                "cloud: no addresses for %s; keeping the %d replicas known, looking again in %gs",
                ", ".join(missing),
                len(self.replicas),
                RETRY_LOOKUP_SECONDS,
            )
        wanted: dict[str, str] = {}  # each address, and the name it was found for
        for name, found in self._found.items():
            for target in found:
                wanted.setdefault(target, name.host)
        for replica in self._fixed:
            wanted.pop(replica.target, None)
        added = sorted(wanted.keys() - self._resolved.keys())
        gone = sorted(self._resolved.keys() - wanted.keys())
        for target in gone:
            self._retire(self._resolved.pop(target))
        for target in added:
            self._resolved[target] = self._make(target, wanted[target])
        if added or gone:
            self.replicas = [*self._fixed, *self._resolved.values()]
            log.info(
                "cloud replicas from DNS: %s (added %s; retired %s)",
                ", ".join(self._resolved) or "none",
                ", ".join(added) or "none",
                ", ".join(gone) or "none",
            )
        return not missing

    def _retire(self, replica: Replica) -> None:
        """A replica DNS no longer lists takes no new calls; those in flight may finish."""
        task = asyncio.create_task(replica.close(self._retire_grace_seconds))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
