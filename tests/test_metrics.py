"""Prometheus metrics: after a known sequence of requests against real processes, the scraped values are
what was sent; every metric the dashboard, the docs and the manifests name is one the servers expose."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import SUBPROCESS_ENV
from offload.cloud.dataplane import CloudDataPlane
from offload.edge.metrics import EdgeCollector
from offload.models import DEMO_REPOSITORY
from offload.oip.client import OipClient
from offload.oip.errors import UpstreamError
from offload.oip.metrics import MetricsServer, metrics_registry, on_loop
from offload.oip.observe import ServerStats
from offload.oip.security import ChannelSecurity, ServerSecurity
from offload.oip.server import OipServer
from offload.oip.stats import Histogram
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, ParameterValue
from offload.router.cache import RowCache
from offload.router.models import RoutedModel
from offload.router.resilience import BreakerState
from offload.router.traffic import CONFIDENCE_BUCKETS
from offload.tools.process import ServerProcess
from support import gate, picky
from support.chaos import ALL_TO_CLOUD, ChaosProxy, edge_under_test, eventually
from support.deployfiles import DEPLOY, ROOT

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
TIMEOUT = 30.0


@dataclass(frozen=True)
class Scrape:
    """One scrape of /metrics: every sample by name and labels, and every family and sample name."""

    samples: Samples
    names: frozenset[str]

    def __call__(self, name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        assert key in self.samples, f"no sample {name}{labels}; have {sorted(k for k, _ in self.samples if k == name)}"
        return self.samples[key]


def scrape(url: str) -> Scrape:
    response = httpx.get(url, timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    names: set[str] = set()
    for family in text_string_to_metric_families(response.text):
        names.add(family.name)
        for sample in family.samples:
            names.add(sample.name)
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(samples, frozenset(names))


def _metrics_url(process: ServerProcess) -> str:
    line = process.wait_for_output("metrics on http://")
    match = re.search(r"metrics on (http://\S+/metrics)", line)
    assert match, line
    return match.group(1)


def _x(*values: float) -> Tensor:
    return Tensor.of("x", np.array([[value] for value in values], dtype=np.float32))


# --- real processes, a known sequence ---------------------------------------------------------------------------

# Rows of model `picky` are their own confidence (support.picky): >= 0.5 stays on the edge, the rest go to
# the cloud, a negative one makes the cloud fail. None sits on a confidence bucket's bound.
EDGE_ROWS = (0.85, 0.75, 0.65)
CLOUD_ROWS = (0.15, 0.25)
MIXED_ROWS = (0.95, 0.35)
FAILING_ROWS = (-0.5,)


@dataclass
class Scrapes:
    edge: Scrape
    cloud: Scrape


@pytest.fixture(scope="module")
def after_a_known_sequence(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scrapes]:
    """An edge agent and a one-slot cloud (one instance a model, one row in flight), both with --metrics-port, after:
    an edge-answered request, an offloaded one, the same again (cached), a mixed one, a degraded one (the
    cloud fails), two the edge refuses (unknown model, wrong shape), and straight to the cloud one that the
    gate holds and one refused at capacity meanwhile."""
    folder = tmp_path_factory.mktemp("metrics")
    repository = picky.write_repository(gate.write_repository(folder / "repository"))
    gate_dir = folder / "gate"
    gate_dir.mkdir()
    env = {
        **SUBPROCESS_ENV,
        gate.MARKER_ENV: str(gate_dir),
        "OFFLOAD_CLOUD_MAX_INFLIGHT_ROWS": "1",
        "OFFLOAD_CLOUD_RESPONSE_CACHE_BYTES": "1000000",
    }
    common = ["--grpc-port", "0", "--model-repository", str(repository), "--metrics-port", "0"]
    with ServerProcess(["cloud", *common, "--inference-threads", "1"], env=env) as cloud:
        cloud_address = cloud.start()
        with ServerProcess(["edge", *common, "--cloud", cloud_address], env=env) as edge:
            edge_address = edge.start()
            # The agent's one look at the cloud at start-up is a ServerReady call the cloud counts.
            edge.wait_for_output("is ready")
            asyncio.run(_send_the_sequence(edge_address, cloud_address, gate_dir))
            yield Scrapes(scrape(_metrics_url(edge)), scrape(_metrics_url(cloud)))


async def _send_the_sequence(edge_address: str, cloud_address: str, gate_dir: Path) -> None:
    async with OipClient(edge_address) as edge:

        async def send(*values: float, model: str = "picky") -> dict[str, ParameterValue]:
            return (await edge.infer(InferRequest(model, [_x(*values)]), timeout=TIMEOUT)).parameters

        assert (await send(*EDGE_ROWS))["offload_route"] == "edge"
        assert (await send(*CLOUD_ROWS))["offload_route"] == "cloud"
        assert (await send(*CLOUD_ROWS))["offload_route"] == "cache"
        assert (await send(*MIXED_ROWS))["offload_route"] == "mixed"
        degraded = await send(*FAILING_ROWS)
        assert (degraded["offload_route"], degraded["offload_degraded"]) == ("edge", True)
        for bad, code in (("nope", grpc.StatusCode.NOT_FOUND), ("wide", grpc.StatusCode.INVALID_ARGUMENT)):
            request = (
                InferRequest("nope", [_x(0.5)])
                if bad == "nope"
                else InferRequest("picky", [Tensor.of("x", np.zeros((1, 2), dtype=np.float32))])
            )
            with pytest.raises(UpstreamError) as refused:
                await edge.infer(request, timeout=TIMEOUT)
            assert refused.value.status == code
    async with OipClient(cloud_address) as cloud:
        held = asyncio.create_task(cloud.infer(InferRequest("gate", [_x(1.0)]), timeout=TIMEOUT))
        try:
            await eventually((gate_dir / "arrived").exists, "the gate holds the first call")
            with pytest.raises(UpstreamError) as full:
                await cloud.infer(InferRequest("gate", [_x(2.0, 3.0)]), timeout=TIMEOUT)
            assert full.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            (gate_dir / "open").touch()
        await held


def test_the_edge_counts_requests_and_rows_by_route_and_status(after_a_known_sequence: Scrapes) -> None:
    edge = after_a_known_sequence.edge
    for route, count in {"edge": 2, "cloud": 1, "cache": 1, "mixed": 1}.items():
        assert edge("offload_edge_requests_total", model="picky", route=route) == count, route
        assert edge("offload_edge_request_duration_seconds_count", model="picky", route=route) == count
    assert edge("offload_edge_degraded_requests_total", model="picky") == 1
    rows = {"edge": len(EDGE_ROWS) + 1, "cloud": len(CLOUD_ROWS) + 1, "cache": len(CLOUD_ROWS), "degraded": 1}
    for route, count in rows.items():
        assert edge("offload_edge_rows_total", model="picky", route=route) == count, route
    # The two refused requests never reached the router: the server holds each request against the model's
    # metadata first (NOT_FOUND, INVALID_ARGUMENT below), so the router counts no error of its own.
    assert edge("offload_edge_request_errors_total") == 0
    # Every call the agent's gRPC server answered, by status, the refused ones included.
    for code, count in {"OK": 5, "NOT_FOUND": 1, "INVALID_ARGUMENT": 1}.items():
        assert edge("offload_edge_grpc_requests_total", method="ModelInfer", code=code) == count, code
    assert edge("offload_edge_grpc_request_duration_seconds_count", method="ModelInfer") == 7
    assert edge("offload_edge_grpc_requests_in_flight") == 0
    assert edge("offload_edge_threshold_ratio", model="picky") == 0.5


def test_the_edge_confidence_histogram_holds_every_row_the_edge_model_ran_on(after_a_known_sequence: Scrapes) -> None:
    edge = after_a_known_sequence.edge
    sent = [*EDGE_ROWS, *CLOUD_ROWS, *CLOUD_ROWS, *MIXED_ROWS, *FAILING_ROWS]
    # As the router reads them: float32 rows, probabilities clipped to [0, 1].
    confidence = np.clip(np.array(sent, dtype=np.float32).astype(np.float64), 0.0, 1.0)
    assert edge("offload_edge_confidence_ratio_count", model="picky") == len(sent)
    assert edge("offload_edge_confidence_ratio_sum", model="picky") == pytest.approx(confidence.sum())
    for bound in CONFIDENCE_BUCKETS:
        below = int(np.count_nonzero(confidence <= bound))
        assert edge("offload_edge_confidence_ratio_bucket", model="picky", le=repr(bound)) == below, bound
    assert edge("offload_edge_confidence_ratio_bucket", model="picky", le="+Inf") == len(sent)


def test_the_edge_counts_cloud_calls_circuit_and_cache(after_a_known_sequence: Scrapes) -> None:
    edge = after_a_known_sequence.edge
    (target,) = {dict(labels)["target"] for name, labels in edge.samples if name == "offload_edge_cloud_requests_total"}
    # The offloaded, the mixed and the degraded request called the cloud; the cached one did not.
    assert edge("offload_edge_cloud_requests_total", target=target) == 3
    assert edge("offload_edge_cloud_attempts_total", target=target, code="OK") == 2
    # INTERNAL is not retried: one attempt, a failure, the row degraded.
    assert edge("offload_edge_cloud_attempts_total", target=target, code="INTERNAL") == 1
    assert edge("offload_edge_cloud_failures_total", target=target) == 1
    assert edge("offload_edge_cloud_retries_total", target=target) == 0
    assert edge("offload_edge_cloud_hedges_total", target=target) == 0
    assert edge("offload_edge_cloud_short_circuited_total", target=target) == 0
    assert edge("offload_edge_cloud_request_duration_seconds_count", target=target) == 3
    assert edge("offload_edge_cloud_circuit_state", target=target, state="closed") == 1
    assert edge("offload_edge_cloud_circuit_state", target=target, state="open") == 0
    assert edge("offload_edge_cloud_circuit_state", target=target, state="half_open") == 0
    assert edge("offload_edge_cloud_circuit_changes_total", target=target) == 0
    assert edge("offload_edge_cloud_retry_tokens_max", target=target) == 10
    # One replica, the --cloud address itself: every attempt went to it.
    assert edge("offload_edge_cloud_replica_requests_total", target=target) == 3
    assert edge("offload_edge_cloud_replica_failures_total", target=target) == 1
    assert edge("offload_edge_cloud_replica_requests_in_flight", target=target) == 0
    assert edge("offload_edge_cloud_replica_circuit_state", target=target, state="closed") == 1
    assert edge("offload_edge_cloud_replica_circuit_changes_total", target=target) == 0
    assert edge("offload_edge_cloud_replica_reachable", target=target) == 1
    # Cached: the offloaded rows once answered; the failed row is not.
    assert edge("offload_edge_cache_hits_total") == len(CLOUD_ROWS)
    assert edge("offload_edge_cache_misses_total") == len(CLOUD_ROWS) + 1 + 1
    assert edge("offload_edge_cache_entries") == len(CLOUD_ROWS) + 1
    assert edge("offload_edge_cache_evictions_total", reason="size") == 0
    assert edge("offload_edge_cache_size_bytes") > 0
    assert edge("offload_edge_audit_rows_total") == 0


def test_the_cloud_counts_statuses_rows_and_its_scheduler(after_a_known_sequence: Scrapes) -> None:
    cloud = after_a_known_sequence.cloud
    # From the edge: the offloaded, the mixed and the degraded request; from the app: the gated call and the
    # one refused at capacity; and the agent's look at start-up.
    for code, count in {"OK": 3, "INTERNAL": 1, "RESOURCE_EXHAUSTED": 1}.items():
        assert cloud("offload_cloud_grpc_requests_total", method="ModelInfer", code=code) == count, code
    assert cloud("offload_cloud_grpc_requests_total", method="ServerReady", code="OK") == 1
    assert cloud("offload_cloud_requests_total", model="picky", route="model") == 2
    assert cloud("offload_cloud_rows_total", model="picky", route="model") == len(CLOUD_ROWS) + 1
    assert cloud("offload_cloud_requests_total", model="gate", route="model") == 1
    assert cloud("offload_cloud_request_duration_seconds_count", model="picky") == 2
    # Admitted: every model call that ran (the failing one too); refused: the two rows at capacity.
    assert cloud("offload_cloud_admitted_rows_total") == len(CLOUD_ROWS) + 1 + 1 + 1
    assert cloud("offload_cloud_rejected_rows_total") == 2
    assert cloud("offload_cloud_rejected_calls_total") == 1
    assert cloud("offload_cloud_started_calls_total") == 4
    assert cloud("offload_cloud_dropped_calls_total") == 0
    assert cloud("offload_cloud_batch_size_rows_count") == 4
    assert cloud("offload_cloud_batch_size_rows_sum") == 5
    assert cloud("offload_cloud_batch_size_rows_bucket", le="1.0") == 3
    assert cloud("offload_cloud_queue_delay_seconds_count") == 4
    assert cloud("offload_cloud_queue_depth") == 0
    assert cloud("offload_cloud_calls_in_flight") == 0
    assert cloud("offload_cloud_calls_in_flight_peak") == 1
    assert cloud("offload_cloud_capacity_calls") == 1
    for model in ("picky", "gate"):
        assert cloud("offload_cloud_model_load_seconds", model=model) > 0
        assert cloud("offload_cloud_model_warmup_seconds", model=model) >= 0
    # Every request the cloud saw was new to its response cache (the edge's row cache answered the repeat);
    # the one refused at capacity was looked up before it was refused.
    assert cloud("offload_cloud_response_cache_hits_total") == 0
    assert cloud("offload_cloud_response_cache_misses_total") == 5
    assert cloud("offload_cloud_response_cache_entries") == 3
    assert cloud("offload_cloud_response_cache_max_bytes") == 1000000
    # The process's own figures come along.
    assert cloud("process_resident_memory_bytes") > 0


def test_every_metric_the_dashboard_docs_and_manifests_name_is_exposed(after_a_known_sequence: Scrapes) -> None:
    exposed = after_a_known_sequence.edge.names | after_a_known_sequence.cloud.names
    dashboard = json.loads((DEPLOY / "grafana" / "offload.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert expressions, "the dashboard has no queries"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"{panel['title']} is wider than the dashboard"
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    texts = {"deploy/grafana/offload.json": "\n".join(expressions)}
    texts["README.md"] = (ROOT / "README.md").read_text()
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.suffix != ".json":
            texts[str(path.relative_to(ROOT))] = path.read_text()
    named = 0
    for where, text in texts.items():
        for name in re.findall(r"\boffload_(?:edge|cloud)_[a-z_]+[a-z]", text):
            named += 1
            assert name in exposed, f"{where}: {name} is not a metric the servers expose"
    assert named >= 20


# --- in process -------------------------------------------------------------------------------------------------


def _digits(request_id: str) -> InferRequest:
    pixels = np.load(DEMO_REPOSITORY / "digits" / "test.npz")["inputs"][:2].astype(np.float32)
    return InferRequest("digits", [Tensor.of("pixels", pixels)], id=request_id, parameters=dict(ALL_TO_CLOUD))


async def test_each_replica_is_a_series_of_its_own_beside_the_pool_totals(
    demo_cloud_plane: CloudDataPlane, demo_edge_models: dict[str, RoutedModel], edge_executor: ThreadPoolExecutor
) -> None:
    """Two replicas (chaos proxies in front of one cloud), one failing every call: its breaker opens at its
    first failure and stays open, and the request it failed is retried on the other, which answers them all."""
    cloud = OipServer(demo_cloud_plane, "replicas-cloud")
    await cloud.start()
    try:
        async with (
            ChaosProxy(f"127.0.0.1:{cloud.port}", seed=1) as failing,
            ChaosProxy(f"127.0.0.1:{cloud.port}", seed=2) as healthy,
        ):
            failing.fail_rate = 1.0  # UNAVAILABLE: retried on the other replica
            pool = f"{failing.address},{healthy.address}"
            async with edge_under_test(
                pool,
                demo_edge_models,
                edge_executor,
                breaker_consecutive_failures=1,
                breaker_cooldown_seconds=3600.0,
                retry_max_attempts=2,
            ) as edge:
                sent = 0
                # Ties between idle replicas are broken at random: send until one request went to the failing one.
                while not failing.request_ids:
                    assert sent < 64, "the balancer never picked the failing replica"
                    answer = await edge.client.infer(_digits(f"replica-{sent}"), timeout=TIMEOUT)
                    assert (answer.parameters["offload_route"], answer.parameters["offload_degraded"]) == (
                        "cloud",
                        False,
                    )
                    sent += 1
                loop = asyncio.get_running_loop()
                server = MetricsServer(metrics_registry(EdgeCollector(on_loop(loop, edge.router.stats))))
                port = server.start("127.0.0.1", 0)
                try:
                    edge_metrics = await asyncio.to_thread(scrape, f"http://127.0.0.1:{port}/metrics")
                finally:
                    await server.stop()
    finally:
        await cloud.stop(0)
    assert len(failing.request_ids) == 1, "its breaker opened at the first failure"
    assert len(healthy.request_ids) == sent
    # The pool: one cloud, labelled as configured.
    assert edge_metrics("offload_edge_cloud_requests_total", target=pool) == sent
    assert edge_metrics("offload_edge_cloud_attempts_total", target=pool, code="OK") == sent
    assert edge_metrics("offload_edge_cloud_attempts_total", target=pool, code="UNAVAILABLE") == 1
    assert edge_metrics("offload_edge_cloud_retries_total", target=pool) == 1
    assert edge_metrics("offload_edge_cloud_failures_total", target=pool) == 0
    assert edge_metrics("offload_edge_cloud_request_duration_seconds_count", target=pool) == sent
    # Closed while any replica's is; the one transition is the failing replica's.
    assert edge_metrics("offload_edge_cloud_circuit_state", target=pool, state="closed") == 1
    assert edge_metrics("offload_edge_cloud_circuit_changes_total", target=pool) == 1
    # Each replica, labelled by its address.
    for replica, calls, failures, state in ((failing, 1, 1, "open"), (healthy, sent, 0, "closed")):
        target = replica.address
        assert edge_metrics("offload_edge_cloud_replica_requests_total", target=target) == calls, target
        assert edge_metrics("offload_edge_cloud_replica_failures_total", target=target) == failures, target
        assert edge_metrics("offload_edge_cloud_replica_requests_in_flight", target=target) == 0
        for each in BreakerState:
            expected = float(each is BreakerState(state))
            assert edge_metrics("offload_edge_cloud_replica_circuit_state", target=target, state=str(each)) == expected
        assert edge_metrics("offload_edge_cloud_replica_circuit_changes_total", target=target) == (state == "open")
        assert edge_metrics("offload_edge_cloud_replica_reachable", target=target) == 1
    replica_series = {
        dict(labels)["target"]
        for name, labels in edge_metrics.samples
        if name == "offload_edge_cloud_replica_requests_total"
    }
    assert replica_series == {failing.address, healthy.address}


async def test_calls_the_token_check_refuses_are_counted_with_their_status(
    demo_cloud_plane: CloudDataPlane, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("the-token\n")
    server = OipServer(demo_cloud_plane, "guarded", security=ServerSecurity.load(auth_token_file=tokens))
    await server.start()
    try:
        async with OipClient(f"127.0.0.1:{server.port}") as client:
            for _ in range(2):
                with pytest.raises(UpstreamError):
                    await client.server_ready(timeout=TIMEOUT)
        token = tmp_path / "token"
        token.write_text("the-token\n")
        async with OipClient(f"127.0.0.1:{server.port}", security=ChannelSecurity.load(token_file=token)) as client:
            assert await client.server_ready(timeout=TIMEOUT)
        stats = server.stats()
    finally:
        await server.stop(0)
    assert stats.calls == {("ServerReady", "UNAUTHENTICATED"): 2, ("ServerReady", "OK"): 1}
    assert stats.seconds["ServerReady"].count == 3
    assert stats.in_flight == 0
    assert isinstance(stats, ServerStats)


def test_a_histogram_counts_each_value_in_the_first_bucket_it_fits_and_skips_nan() -> None:
    histogram = Histogram((0.1, 1.0))
    histogram.observe(0.1)  # on a bound: that bucket (Prometheus' le is "less than or equal")
    histogram.observe(0.5)
    histogram.observe_many(np.array([2.0, np.nan, 0.05]))
    histogram.observe(float("nan"))
    snapshot = histogram.snapshot()
    assert snapshot.counts == (2, 1, 1)
    assert snapshot.total == pytest.approx(2.65)
    assert snapshot.cumulative() == [(0.1, 2), (1.0, 3), (float("inf"), 4)]
    with pytest.raises(ValueError, match="ascending"):
        Histogram((1.0, 1.0))


async def test_the_row_cache_counts_evictions_to_make_room_and_expiries_apart() -> None:
    now = [0.0]
    row = {"y": np.zeros(1, dtype=np.float32)}
    # What one entry of this row is charged, read off a cache that holds just it; room for three, not four.
    alone = RowCache(max_bytes=1 << 20, ttl_seconds=10.0)
    alone.fulfil(alone.plan([b"alone"]), "m", "1", [row])
    cache = RowCache(max_bytes=3 * alone.bytes_used, ttl_seconds=10.0, timer=lambda: now[0])
    for index in range(4):
        plan = cache.plan([f"key-{index}".encode()])
        cache.fulfil(plan, "m", "1", [row])
    assert (cache.stats().evicted, cache.stats().expired, cache.stats().entries) == (1, 0, 3)
    now[0] = 11.0
    cache.plan([b"key-9"])  # a lookup after the TTL drops what expired
    stats = cache.stats()
    assert (stats.evicted, stats.expired, stats.entries) == (1, 3, 0)
