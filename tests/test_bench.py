"""`offload bench` against real servers on loopback: the `offload cloud` and `offload edge` processes,
and the bare echo server (the one here with ModelStreamInfer). Counts and files, never timings."""

from __future__ import annotations

import csv
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from conftest import Processes
from offload.models import DEMO_REPOSITORY
from offload.oip.errors import ConfigurationError
from offload.tools.bare_echo import SERVICE_NAME, start_bare_echo
from offload.tools.bench import BenchOptions, parse_parameter, run_bench
from offload.tools.bench_load import Step
from offload.tools.cli import main

# Short steps that still count a few requests however slow a loaded machine makes them.
MIN_REQUESTS = 3
SHORT = ["--duration", "0.5", "--warmup", "0.2", "--min-requests", str(MIN_REQUESTS), "--no-progress"]
PIXELS = ["--input", "pixels", "--shape", "1,64", "--datatype", "FP32"]


def _bench(capsys: pytest.CaptureFixture[str], tmp_path: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    """Run `offload bench ... --json FILE`; the exit status, the JSON report and stderr."""
    report = tmp_path / "report.json"
    status = main(["bench", *args, *SHORT, "--json", str(report)])
    captured = capsys.readouterr()
    return status, json.loads(report.read_text()) if report.exists() else {}, captured.err


def test_help_names_the_load_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    flags = ("--concurrency", "--rate", "--streaming", "--parameter", "--data", "--csv", "--json", "--processes")
    for flag in (*flags, "--min-requests"):
        assert flag in text


def test_sweep_against_the_cloud_counts_answers_and_writes_csv_and_json(
    demo_processes: Processes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = tmp_path / "steps.csv"
    args = ["--target", demo_processes.cloud.address, "-m", "digits", "--concurrency", "1,4", "--csv", str(table)]
    status, report, _ = _bench(capsys, tmp_path, *args)
    assert status == 0
    # Input name, datatype and shape came from the cloud's model metadata (open rows sent as 1).
    assert (report["input_name"], report["datatype"], report["shape"]) == ("pixels", "FP32", [1, 64])
    assert [step["load"] for step in report["steps"]] == [1.0, 4.0]
    for step in report["steps"]:
        assert step["ok"] >= MIN_REQUESTS
        assert step["failed"] == 0
        assert step["errors"] == {}
        assert 0 < step["p50_ms"] <= step["p90_ms"] <= step["p99_ms"]
        assert step["rps"] == pytest.approx(step["ok"] / step["seconds"])
    with table.open() as file:
        rows = list(csv.DictReader(file))
    assert [int(row["ok"]) for row in rows] == [step["ok"] for step in report["steps"]]
    assert [row["mode"] for row in rows] == ["concurrency", "concurrency"]


def test_a_wrong_model_name_is_counted_as_not_found(
    demo_processes: Processes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--target", demo_processes.cloud.address, "-m", "no-such-model", *PIXELS, "--concurrency", "2"]
    status, report, _ = _bench(capsys, tmp_path, *args)
    assert status == 1  # some requests failed
    (step,) = report["steps"]
    assert step["ok"] == 0
    assert set(step["errors"]) == {"NOT_FOUND"}
    assert step["errors"]["NOT_FOUND"] == step["failed"] >= MIN_REQUESTS
    assert step["p50_ms"] is None


def test_without_metadata_it_says_which_flags_replace_it(
    demo_processes: Processes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, report, err = _bench(capsys, tmp_path, "--target", demo_processes.cloud.address, "-m", "no-such-model")
    assert status == 2
    assert report == {}
    assert "NOT_FOUND" in err
    assert "--input" in err


def test_typed_parameters_and_npz_rows_reach_the_edge_agent(
    demo_processes: Processes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data", str(DEMO_REPOSITORY / "digits" / "test.npz"), "--rows", "8"]
    edge = ["--target", demo_processes.edge.address, "-m", "digits", *data, "--parameter", "offload_route=edge"]
    # offload_details must be a bool: true travels as bool_param, 1 as int64_param.
    status, report, _ = _bench(capsys, tmp_path, *edge, "--parameter", "offload_details=true")
    assert status == 0
    (step,) = report["steps"]
    assert step["ok"] >= MIN_REQUESTS
    assert step["rows_per_request"] == 8
    assert step["rows_per_second"] == pytest.approx(8 * step["rps"])
    status, report, _ = _bench(capsys, tmp_path, *edge, "--parameter", "offload_details=1")
    assert status == 1
    assert set(report["steps"][0]["errors"]) == {"INVALID_ARGUMENT"}


def test_a_window_counts_what_completes_inside_it_and_stretches_for_its_minimum() -> None:
    window = Step("concurrency", 1, began=0, start=100, end=200, min_requests=3).window()
    window.record(done=50, latency=50, status="OK")  # warm-up: not counted
    window.record(done=150, latency=10, status="OK")
    window.record(done=160, latency=10, status="NOT_FOUND")
    assert window.open(199)
    assert window.open(250)  # past the end, but only 2 of 3 completed
    window.record(done=300, latency=20, status="OK")  # the third: the window now ends here
    assert (window.end, window.completed, window.latencies, dict(window.errors)) == (300, 3, [10, 20], {"NOT_FOUND": 1})
    window.record(done=301, latency=5, status="OK")  # after the end, minimum met: not counted
    assert not window.open(301)
    assert window.completed == 3
    # Client processes each wait for their share of the minimum, rounded up.
    assert Step("rate", 10.0, 0, 0, 1, min_requests=5).window(shares=2).min_requests == 3


def test_parameters_are_typed_by_their_look_or_by_name() -> None:
    assert parse_parameter("offload_route=edge") == ("offload_route", "edge")
    assert parse_parameter("offload_details=True") == ("offload_details", True)
    assert parse_parameter("n=3") == ("n", 3)
    assert parse_parameter("offload_threshold=0.5") == ("offload_threshold", 0.5)
    assert parse_parameter("tag:string=3") == ("tag", "3")
    assert parse_parameter("x:float=1") == ("x", 1.0)
    refusals = {
        "no-equals": "is not NAME=VALUE",
        "=1": "is not NAME=VALUE",
        "x:int=one": "invalid literal",
        "x:list=1": "is not bool, int, float or string",
        "x:bool=yes": "is not true or false",
    }
    for bad, why in refusals.items():
        with pytest.raises(ValueError, match=why):
            parse_parameter(bad)


@pytest.fixture
async def echo_address() -> AsyncIterator[str]:
    server, port = await start_bare_echo()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


def _options(target: str, **changes: Any) -> BenchOptions:
    base: dict[str, Any] = {
        "model": "digits",
        "input_name": "pixels",
        "shape": (1, 64),
        "datatype": "FP32",
        "duration": 0.5,
        "warmup": 0.2,
        "min_requests": MIN_REQUESTS,
        "progress": False,
    }
    return BenchOptions(target, **{**base, **changes})


async def test_streaming_closed_and_open_loop_against_the_echo_stream(echo_address: str) -> None:
    closed = await run_bench(_options(echo_address, streaming=True, concurrency=(1, 4), channels=2))
    opened = await run_bench(_options(echo_address, streaming=True, rates=(200.0,)))
    assert [(step.mode, step.load) for step in (*closed.steps, *opened.steps)] == [
        ("concurrency", 1.0),
        ("concurrency", 4.0),
        ("rate", 200.0),
    ]
    for step in (*closed.steps, *opened.steps):
        assert step.ok >= MIN_REQUESTS
        assert step.errors == {}


async def test_client_processes_share_the_load_and_their_counts_add_up(echo_address: str) -> None:
    report = await run_bench(_options(echo_address, concurrency=(3,), processes=2))
    (step,) = report.steps
    assert step.ok >= MIN_REQUESTS  # each of the 2 processes waited for its half, rounded up
    assert step.errors == {}
    assert step.p50_ms is not None


async def test_a_server_without_model_stream_infer_gets_a_clear_error() -> None:
    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {"ModelInfer": grpc.unary_unary_rpc_method_handler(echo)}
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        with pytest.raises(ConfigurationError, match="does not implement ModelStreamInfer"):
            await run_bench(_options(f"127.0.0.1:{port}", streaming=True))
        # The same server takes unary calls.
        report = await run_bench(_options(f"127.0.0.1:{port}"))
        assert report.steps[0].ok >= MIN_REQUESTS
    finally:
        await server.stop(0)
