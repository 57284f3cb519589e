"""Many cloud replicas behind one edge: balancing, a circuit breaker per replica, one retry budget.

Three real `offload cloud` processes on loopback (started together: each takes seconds to load
its model) serve the demo model. The edge is a real `offload edge` process, or the router as the
agent wires it on a loopback port (chaos.edge_under_test), whose stats snapshot counts each
replica's calls. Under load, one replica is killed and another frozen (SIGSTOP, then SIGCONT):
no request fails, few are degraded, and the killed one, restarted, takes traffic again.

The unit tests (the balancer's choice, a retry or a hedge sent to another replica, DNS discovery,
`--cloud` parsing) use an in-process echo server behind chaos proxies, one proxy per replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
from pydantic import ValidationError

from conftest import SUBPROCESS_ENV
from offload.edge.settings import EdgeSettings
from offload.edge.status import StatusLog
from offload.oip.client import OipClient
from offload.oip.server import OipServer
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest
from offload.router.balancer import pick
from offload.router.discovery import CloudTargets, DnsName, Resolver, lookup
from offload.router.models import RoutedModel
from offload.router.pool import CloudPool
from offload.router.resilience import BreakerPolicy, BreakerState, RetryBudget, RetryThrottle
from offload.router.stats import ReplicaStats
from offload.router.upstream import CloudFailure, RetryPolicy
from offload.tools.process import ServerProcess
from support.chaos import (
    MODEL,
    Call,
    ChaosProxy,
    Edge,
    Reference,
    Summary,
    burst,
    check,
    edge_under_test,
    eventually,
    retry_bound,
)
from support.echo_plane import EchoPlane

DEADLINE = 1.5  # the app's gRPC deadline per request (the edge's cloud timeout is 1 s)
REPLICAS = 3


class Clouds:
    """Three `offload cloud` processes on loopback; one can be restarted on its port."""

    def __init__(self) -> None:
        self.processes: list[ServerProcess] = []
        self.addresses: list[str] = []

    def start(self) -> None:
        with ThreadPoolExecutor(REPLICAS) as starter:
            self.addresses = list(starter.map(lambda _: self._start(0), range(REPLICAS)))

    def restart(self, index: int) -> None:
        """Start replica `index` again on the port it had (the edge knows it by its address)."""
        assert self._start(self.addresses[index].rsplit(":", 1)[1]) == self.addresses[index]

    def _start(self, port: int | str) -> str:
        process = ServerProcess(["cloud", "--grpc-port", str(port), "--device", "cpu"])
        self.processes.append(process)
        return process.start()

    def process(self, index: int) -> ServerProcess:
        """The live process of replica `index` (the latest started on its address)."""
        return next(p for p in reversed(self.processes) if p.address == self.addresses[index])

    @property
    def target(self) -> str:
        """The edge's --cloud value: every replica."""
        return ",".join(self.addresses)

    def stop(self) -> None:
        for process in self.processes:
            process.signal(signal.SIGCONT)  # a frozen process cannot die
            process.kill()


@pytest.fixture(scope="module")
def clouds() -> Iterator[Clouds]:
    replicas = Clouds()
    try:
        replicas.start()
        yield replicas
    finally:
        replicas.stop()


@pytest.fixture(scope="module")
def reference(clouds: Clouds, demo_edge_models: dict[str, RoutedModel]) -> Reference:
    for address in clouds.addresses[1:]:
        Reference.of_demo(address, demo_edge_models[MODEL])  # warms every replica up the same way
    return Reference.of_demo(clouds.addresses[0], demo_edge_models[MODEL])


def replica(edge: Edge, target: str) -> ReplicaStats:
    stats = edge.router.stats().cloud
    assert stats is not None
    return next(replica for replica in stats.replicas if replica.target == target)


def answered(edge: Edge, target: str) -> int:
    """Calls the replica at `target` answered."""
    stats = replica(edge, target)
    return stats.calls - stats.failures


# --- Three real replicas under load ---


async def test_a_real_agent_spreads_calls_over_every_replica(clouds: Clouds, reference: Reference) -> None:
    """`offload edge --cloud A,B,C`: every replica takes calls, as the agent's status line counts them."""
    edge = ServerProcess(
        ["edge", "--grpc-port", "0", "--cloud", clouds.target],
        # The status line comes once, at shutdown, covering the whole run. Coalescing is off, so that each
        # request's rows travel in a call of their own (the count below).
        env={**SUBPROCESS_ENV, "OFFLOAD_EDGE_STATUS_LOG_SECONDS": "3600", "OFFLOAD_EDGE_COALESCE_MAX_ROWS": "0"},
    )
    with edge:
        address = await asyncio.to_thread(edge.start)
        async with OipClient(address) as client:
            calls = await burst(client, reference, 45, tag="spread", concurrency=6, timeout=DEADLINE)
        assert check(calls, reference) == []
        edge.signal(signal.SIGTERM)
        assert await asyncio.to_thread(edge.wait) == 0
    (line,) = [line for line in edge.output().splitlines() if "status over the last" in line]
    # Under load a call can outlast its deadline (answered on the edge, degraded): spreading is what counts.
    assert "45 requests (" in line
    assert "0 errors)" in line
    pool = re.search(r"(\d+) calls \((\d+) failed, (\d+) short-circuited, (\d+) retries, (\d+) hedges\)", line)
    replicas = re.search(r"replicas \(calls/failed/in flight\): ([^;]+)", line)
    assert pool is not None, line
    assert replicas is not None, line
    cloud_calls, _, short_circuited, retries, hedges = (int(figure) for figure in pool.groups())
    # Every request's three rows went to the cloud in one call (no row repeats, so none was cached).
    assert cloud_calls == 45
    sent = {}
    for part in replicas.group(1).split(", "):
        target, _, figures = part.split(" ")
        sent[target] = int(figures.split("/")[0])
    assert set(sent) == set(clouds.addresses)
    assert all(count > 0 for count in sent.values()), f"a replica took no call: {sent}"
    assert sum(sent.values()) <= cloud_calls - short_circuited + retries + hedges


async def test_a_killed_and_a_frozen_replica_cost_no_failed_request_and_the_killed_one_comes_back(
    clouds: Clouds, reference: Reference, demo_edge_models: dict[str, RoutedModel], edge_executor: ThreadPoolExecutor
) -> None:
    killed, frozen, healthy = clouds.addresses
    async with edge_under_test(clouds.target, demo_edge_models, edge_executor) as edge:
        stopped = False

        def break_replicas(call: Call, completed: int) -> None:
            nonlocal stopped
            if completed == 20:
                clouds.process(0).kill()  # SIGKILL, and reaped
            elif completed == 50:
                clouds.process(1).signal(signal.SIGSTOP)
                stopped = True
            elif stopped and replica(edge, frozen).failures:
                # Frozen until a call to it has run out of time: then it thaws.
                clouds.process(1).signal(signal.SIGCONT)
                stopped = False

        try:
            calls = await burst(
                edge.client, reference, 150, tag="faults", concurrency=8, timeout=DEADLINE, on_done=break_replicas
            )
        finally:
            clouds.process(1).signal(signal.SIGCONT)
        assert not stopped, "a call to the frozen replica ran out of time"
        summary = Summary.of(calls)
        share = f"{summary.degraded} of {summary.sent} degraded, {summary.failed} failed"
        print(f"\nkill and freeze of 2 of 3 replicas: {share}")  # the figure, for the report
        assert summary.failed == 0
        assert check(calls, reference) == []
        assert summary.degraded <= summary.sent // 10, f"{summary.degraded} of {summary.sent} degraded"
        stats = edge.endpoint.stats()
        assert stats.retries + stats.hedges <= retry_bound(edge.endpoint)
        assert sum(replica.calls for replica in stats.replicas) == stats.attempts
        assert replica(edge, healthy).circuit is BreakerState.CLOSED
        dead = replica(edge, killed)
        assert not dead.reachable or dead.circuit is not BreakerState.CLOSED, "the killed replica is known as such"

        # Restarted on its port, the killed replica takes calls again: wait until one succeeds there.
        await asyncio.to_thread(clouds.restart, 0)
        before, index, started = answered(edge, killed), 1000, time.monotonic()
        while answered(edge, killed) == before:
            assert time.monotonic() - started < 30, "the restarted replica answered no call within 30 s"
            await burst(edge.client, reference, 3, tag="back", concurrency=3, timeout=DEADLINE, first_index=index)
            index += 3
            await asyncio.sleep(0.02)  # pacing the polling loop that waits for the restarted replica
        restarted, thawed = answered(edge, killed), answered(edge, frozen)
        again = await burst(edge.client, reference, 30, tag="again", concurrency=6, timeout=DEADLINE, first_index=0)
        assert check(again, reference) == []
        assert all(call.error is None for call in again)
        assert answered(edge, killed) > restarted, "the restarted replica takes its share"
        assert answered(edge, frozen) > thawed, "so does the thawed one"


async def test_breakers_per_replica_and_the_health_service_follow_the_replicas(
    clouds: Clouds, reference: Reference, demo_edge_models: dict[str, RoutedModel], edge_executor: ThreadPoolExecutor
) -> None:
    """Two replicas failing: their circuits open, the third serves, `offload.cloud` stays SERVING;
    all three failing: NOT_SERVING. The status line has each replica's part."""
    async with (
        ChaosProxy(clouds.addresses[0], seed=1) as first,
        ChaosProxy(clouds.addresses[1], seed=2) as second,
        ChaosProxy(clouds.addresses[2], seed=3) as third,
    ):
        proxies = (first, second, third)
        target = ",".join(proxy.address for proxy in proxies)
        async with edge_under_test(target, demo_edge_models, edge_executor, breaker_cooldown_seconds=60.0) as edge:
            now = [0.0]
            status = StatusLog(edge.router.stats, 60.0, clock=lambda: now[0])
            first.fail_rate = second.fail_rate = 1.0
            for _ in range(40):  # until both failing replicas' circuits are open (5 failures each)
                await burst(edge.client, reference, 1, tag="two-down", concurrency=1, timeout=DEADLINE)
                if all(replica(edge, proxy.address).circuit is BreakerState.OPEN for proxy in (first, second)):
                    break
            assert replica(edge, first.address).circuit is BreakerState.OPEN
            assert replica(edge, second.address).circuit is BreakerState.OPEN
            assert replica(edge, third.address).circuit is BreakerState.CLOSED
            cloud = edge.router.stats().cloud
            assert cloud is not None
            assert cloud.circuit is BreakerState.CLOSED, "closed while any replica's is"
            await edge.wait_for_cloud_health(serving=True)
            calls = await burst(edge.client, reference, 12, tag="served", concurrency=4, timeout=DEADLINE)
            assert all(call.from_cloud for call in calls), "the open replicas are skipped, the third serves"

            now[0] = 60.0
            line = status.line()
            assert line is not None
            cloud = edge.router.stats().cloud
            assert cloud is not None
            parts = [f"{r.target} {r.circuit} {r.calls}/{r.failures}/0" for r in cloud.replicas]
            assert f"; replicas (calls/failed/in flight): {', '.join(parts)}" in line, line
            assert f"cloud {target}: circuit closed (2 changes)" in line

            third.fail_rate = 1.0
            await burst(edge.client, reference, 8, tag="all-down", concurrency=1, timeout=DEADLINE)
            await edge.wait_for_cloud_health(serving=False)
            assert all(replica(edge, proxy.address).circuit is BreakerState.OPEN for proxy in proxies)


# --- The balancer's choice ---


@dataclass
class Candidate:
    name: str
    outstanding: int = 0
    is_ready: bool = True
    is_reachable: bool = True

    def ready(self) -> bool:
        return self.is_ready

    def reachable(self) -> bool:
        return self.is_reachable


def test_the_balancer_picks_the_least_busy_replica_whose_breaker_lets_a_call_through() -> None:
    rng = random.Random(0)
    a, b, c = Candidate("a", 3), Candidate("b", 1), Candidate("c", 0, is_ready=False)
    assert pick([a, b, c], [], rng) is b, "c is idle, but its circuit is open"
    b.outstanding = 4
    assert pick([a, b, c], [], rng) is a
    assert pick([c], [], rng) is None
    assert pick([], [], rng) is None


def test_a_retry_goes_to_a_replica_the_request_has_not_tried_even_a_busier_one() -> None:
    rng = random.Random(0)
    a, b = Candidate("a", 0), Candidate("b", 5)
    assert pick([a, b], [a], rng) is b
    assert pick([a, b], [a, b], rng) is a, "all tried: the least busy again"
    assert pick([a], [a], rng) is a, "a pool of one retries its one replica"


def test_a_replica_that_cannot_connect_is_picked_only_when_no_other_can_take_the_call() -> None:
    rng = random.Random(0)
    dead, busy = Candidate("dead", 0, is_reachable=False), Candidate("busy", 7)
    assert pick([dead, busy], [busy], rng) is busy, "one that can connect, though tried and busy"
    busy.is_ready = False
    assert pick([dead, busy], [], rng) is dead, "nothing else: calling it fails fast, as a pool of one would"


def test_ties_are_broken_at_random_so_idle_replicas_share_the_load() -> None:
    rng = random.Random(0)
    replicas = [Candidate(name) for name in "abc"]
    picked = [pick(replicas, [], rng) for _ in range(300)]
    counts = {replica.name: sum(choice is replica for choice in picked) for replica in replicas}
    assert all(count > 50 for count in counts.values()), counts


# --- Retries and hedges across replicas, DNS discovery (in-process echo server, a proxy per replica) ---


@pytest.fixture
async def echo() -> AsyncIterator[str]:
    server = OipServer(EchoPlane(), "echo")
    port = await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


@pytest.fixture
async def proxies(echo: str) -> AsyncIterator[tuple[ChaosProxy, ChaosProxy]]:
    async with ChaosProxy(echo, seed=1) as first, ChaosProxy(echo, seed=2) as second:
        yield first, second


def _pool(
    target: str,
    retry: RetryPolicy | None = None,
    hedge_delay_seconds: float | None = None,
    resolver: Resolver = lookup,
    resolve_seconds: float = 30.0,
) -> CloudPool:
    """A pool with a large budget and breakers that stay closed (the balancer's doing is what is tested)."""
    return CloudPool(
        target,
        10.0,
        1 << 20,
        retry=retry,
        throttle=RetryThrottle(RetryBudget(100, 0.1)),
        breaker=BreakerPolicy(consecutive_failures=1000, min_calls=1000),
        hedge_delay_seconds=hedge_delay_seconds,
        resolver=resolver,
        resolve_seconds=resolve_seconds,
        rng=random.Random(5),
    )


def _request(request_id: str) -> InferRequest:
    return InferRequest("echo", [Tensor.of("x", np.array([[1.0]], dtype=np.float32))], id=request_id)


async def test_a_retry_goes_to_another_replica(proxies: tuple[ChaosProxy, ChaosProxy]) -> None:
    failing, healthy = proxies
    failing.fail_rate = 1.0  # UNAVAILABLE: retried
    pool = _pool(f"{failing.address},{healthy.address}", retry=RetryPolicy(max_attempts=2))
    try:
        for index in range(20):
            await pool.infer(_request(f"r{index}"), deadline=None)  # two attempts: none fails
    finally:
        await pool.close()
    assert failing.request_ids, "some requests tried the failing replica first"
    assert len(set(failing.request_ids)) == len(failing.request_ids), "never twice at the failing one"
    assert set(failing.request_ids) <= set(healthy.request_ids), "each was retried on the other"
    assert pool.stats().retries == len(failing.request_ids)


async def test_a_hedge_goes_to_another_replica(proxies: tuple[ChaosProxy, ChaosProxy]) -> None:
    slow, fast = proxies
    slow.delay_seconds = 5.0  # past every deadline here: only a hedge answers
    pool = _pool(f"{slow.address},{fast.address}", hedge_delay_seconds=0.05)
    try:
        for index in range(12):
            await pool.infer(_request(f"h{index}"), deadline=time.monotonic() + 3.0)
        await eventually(lambda: slow.cancelled == len(slow.request_ids), "the slow attempts were cancelled")
    finally:
        await pool.close()
    assert slow.request_ids, "some requests went to the slow replica first"
    assert set(slow.request_ids) <= set(fast.request_ids), "each was hedged on the other"
    assert len(set(fast.request_ids)) == len(fast.request_ids) == 12
    stats = pool.stats()
    assert stats.hedges == len(slow.request_ids)
    assert {replica.target: replica.outstanding for replica in stats.replicas} == {slow.address: 0, fast.address: 0}


async def test_a_dns_name_gives_a_replica_per_address_looked_up_again(
    proxies: tuple[ChaosProxy, ChaosProxy], caplog: pytest.LogCaptureFixture
) -> None:
    first, second = proxies
    answers: list[list[str] | OSError] = [[first.address]]
    asked: list[tuple[str, int]] = []

    async def resolver(host: str, port: int) -> list[str]:
        asked.append((host, port))
        answer = answers[-1]
        if isinstance(answer, OSError):
            raise answer
        return answer

    def targets() -> list[str]:
        return [replica.target for replica in pool.replicas]

    pool = _pool("dns:///replicas.cloud.test:8101", resolver=resolver, resolve_seconds=0.01)
    try:
        await pool.infer(_request("one"), deadline=None)  # waits for the first lookup
        assert asked[0] == ("replicas.cloud.test", 8101)
        assert targets() == [first.address]
        answers.append([first.address, second.address])
        await eventually(lambda: targets() == [first.address, second.address], "a new address is a new replica")
        answers.append([second.address])
        await eventually(lambda: targets() == [second.address], "a gone address is retired")
        calls = first.calls
        for index in range(5):
            await pool.infer(_request(f"after-{index}"), deadline=None)
        assert first.calls == calls, "a retired replica takes no call"
        caplog.set_level(logging.WARNING, logger="offload.router.discovery")
        answers.append(OSError("lookup failed"))
        lookups = len(asked)
        await eventually(lambda: len(asked) > lookups + 1, "the name is looked up again")
        assert targets() == [second.address], "a failed lookup keeps the replicas known"
        assert "no addresses for dns:///replicas.cloud.test:8101 (lookup failed)" in caplog.text
        assert pool.stats().calls == 6, "the pool's totals keep the retired replica's calls"
    finally:
        await pool.close()


async def test_a_dns_lookup_that_hangs_holds_no_request_past_its_deadline() -> None:
    hang = asyncio.Event()

    async def resolver(host: str, port: int) -> list[str]:
        await hang.wait()  # a DNS server that does not answer
        return []

    pool = _pool("dns:///silent.cloud.test:8101", resolver=resolver)
    try:
        with pytest.raises(CloudFailure, match=r"no address of dns:///silent.cloud.test:8101 is known yet"):
            await pool.infer(_request("waits"), deadline=time.monotonic() + 0.2)
        assert pool.stats().short_circuited == 1
    finally:
        await pool.close()


async def test_a_real_dns_lookup_of_localhost(echo: str) -> None:
    port = int(echo.rsplit(":", 1)[1])
    pool = _pool(f"dns:///localhost:{port}")
    try:
        response = await pool.infer(_request("localhost"), deadline=time.monotonic() + 5.0)
        assert response.outputs[0].data.tolist() == [[1.0]]
        hosts = {str(info[4][0]) for info in socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM)}
        targets = {replica.target for replica in pool.replicas}
        assert targets == {f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host in hosts}
        assert f"127.0.0.1:{port}" in targets
    finally:
        await pool.close()


async def test_the_start_up_look_is_ready_while_one_replica_answers_and_names_every_one_that_does_not(
    echo: str, caplog: pytest.LogCaptureFixture
) -> None:
    closed = [f"127.0.0.1:{port}" for port in _closed_ports(2)]
    caplog.set_level(logging.WARNING, logger="offload.router.pool")
    pool = _pool(f"{echo},{closed[0]}")
    try:
        assert await pool.check_ready(5.0) is None, "one replica answers: the cloud is ready"
        warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert f"1 of 2 replicas do not answer ({closed[0]}: UNAVAILABLE" in warnings[0]
        assert echo not in warnings[0].partition("do not answer")[2], "the replica that answers is not named"
        assert pool.stats().attempts == 0, "a look, not traffic"
    finally:
        await pool.close()
    pool = _pool(",".join(closed))
    try:
        problem = await pool.check_ready(5.0)
        assert problem is not None
        assert problem.startswith("no replica answers: ")
        assert f"{closed[0]}: UNAVAILABLE" in problem
        assert f"{closed[1]}: UNAVAILABLE" in problem
    finally:
        await pool.close()


async def test_the_start_up_look_at_a_dns_name_without_addresses_says_so() -> None:
    async def resolver(host: str, port: int) -> list[str]:
        raise OSError("no such name")

    pool = _pool("dns:///nowhere.cloud.test:8101", resolver=resolver)
    try:
        assert await pool.check_ready(1.0) == "no address of dns:///nowhere.cloud.test:8101 is known yet"
    finally:
        await pool.close()


def _closed_ports(count: int) -> list[int]:
    """Different ports nothing listens on: bound by the OS for us together, then let go."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]


# --- The --cloud value ---


def test_cloud_takes_several_addresses_and_dns_names() -> None:
    assert CloudTargets.parse("a:1, b:2") == CloudTargets(("a:1", "b:2"), ())
    assert CloudTargets.parse("dns:///cloud.ns.svc:8101") == CloudTargets((), (DnsName("cloud.ns.svc", 8101),))
    assert CloudTargets.parse("dns:cloud:8101,c:3") == CloudTargets(("c:3",), (DnsName("cloud", 8101),))
    assert CloudTargets.parse("dns:///[fd00::1]:8101").names == (DnsName("fd00::1", 8101),)
    assert str(DnsName("fd00::1", 8101)) == "dns:///[fd00::1]:8101"
    assert EdgeSettings(cloud="a:1,b:2").cloud == "a:1,b:2"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("a:1,,b:2", "has an empty entry"),
        ("a:1,a:1", "lists 'a:1' more than once"),
        ("dns:///cloud", "dns:///NAME:PORT needs a name and a port"),
        ("dns:///cloud:0", "dns:///NAME:PORT needs a name and a port"),
        ("dns:///:8101", "dns:///NAME:PORT needs a name and a port"),
        ("dns://8.8.8.8/cloud:8101", "a DNS server in the target is not supported"),
        ("dns://cloud:8101", "write dns:///NAME:PORT (three slashes)"),
        ("a:1,gpu-host", "'gpu-host' is not HOST:PORT: it has no port (gpu-host:8101, 10.0.0.5:8101 or "),
        ("a:1, ::1:8101", "'::1:8101' is not HOST:PORT: an IPv6 address goes in brackets, as in [::1]:8101"),
        ("dns:///not a host:8101", "'not a host' is neither an IP address nor a DNS name"),
        ("unix:/run/cloud.sock", "'unix:/run/cloud.sock' is not HOST:PORT"),
    ],
)
def test_a_bad_cloud_value_is_refused_with_what_to_write(value: str, message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        EdgeSettings(cloud=value)
