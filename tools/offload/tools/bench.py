"""`offload bench`: load any OIP gRPC server (ours, Triton, MLServer) and measure it, step by step.

In the spirit of Triton's perf_analyzer. A step is a load level held for a warm-up (answers not
counted) and then `duration` seconds; what completes inside that window counts.
- Closed loop (`--concurrency 1,8,64`): N workers, each with one request in flight at a time.
- Open loop (`--rate 500`): requests go out at fixed times whatever the server does, and each
  latency runs from the request's scheduled send time, so time queued behind a slow server counts.
Throughput counts successful requests and latency percentiles are theirs; failures are counted by
gRPC status. The payloads (random data of a shape, or rows of an .npz) are encoded before the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import math
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from offload.oip.client import OipClient
from offload.oip.datatypes import DATATYPES, datatype_for
from offload.oip.errors import ConfigurationError, UpstreamError
from offload.oip.messages import request_to_pb
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, ParameterValue
from offload.tools.bench_load import ClientProcesses, Step, Window, drive
from offload.tools.bench_transport import OK, Connection, StreamTransport, Transport, connected

# Distinct random payloads per run (more than one, so no server answers from a one-entry cache),
# and the most memory all prepared payloads may take.
RANDOM_PAYLOADS = 16
MAX_PREPARED_BYTES = 256 * 1024 * 1024
PROGRESS_SECONDS = 0.25
# Time for client processes to receive a step before it begins.
STEP_NOTICE_SECONDS = 0.2


@dataclass(frozen=True)
class BenchOptions:
    target: str
    model: str
    model_version: str = ""
    # What to send: an input name, datatype and whole-request shape (the first dimension is the rows
    # per request), each from the model's metadata when not given; or the rows of an .npz file.
    input_name: str | None = None
    shape: tuple[int, ...] | None = None
    datatype: str | None = None
    data: Path | None = None
    rows: int | None = None
    parameters: Mapping[str, ParameterValue] = field(default_factory=dict)
    # The steps: closed-loop concurrencies, or open-loop rates (requests per second) when given.
    concurrency: tuple[int, ...] = (1,)
    rates: tuple[float, ...] = ()
    duration: float = 10.0
    warmup: float = 2.0
    # A step counts on past `duration` until at least this many requests completed (0: time only).
    min_requests: int = 0
    streaming: bool = False
    timeout: float = 30.0
    channels: int = 1
    # Client processes that share the load (1: this process sends); each has `channels` channels.
    processes: int = 1
    max_message_bytes: int = 64 * 1024 * 1024
    progress: bool = True
    seed: int = 0

    @property
    def connection(self) -> Connection:
        return Connection(self.target, self.channels, self.streaming, self.timeout, self.max_message_bytes)

    @property
    def steps(self) -> list[tuple[str, float]]:
        return [("rate", rate) for rate in self.rates] or [("concurrency", float(n)) for n in self.concurrency]


@dataclass(frozen=True)
class Payloads:
    input_name: str
    datatype: str
    shape: tuple[int, ...]
    requests: list[bytes]

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1


@dataclass(frozen=True)
class StepResult:
    mode: str  # "concurrency" or "rate"
    load: float  # workers, or requests per second
    rows_per_request: int
    seconds: float
    ok: int
    errors: dict[str, int]
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    mean_ms: float | None

    @property
    def rps(self) -> float:
        return self.ok / self.seconds

    @property
    def rows_per_second(self) -> float:
        return self.rps * self.rows_per_request

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rps": self.rps, "rows_per_second": self.rows_per_second, "failed": self.failed}


@dataclass(frozen=True)
class BenchReport:
    target: str
    model: str
    input_name: str
    datatype: str
    shape: tuple[int, ...]
    streaming: bool
    steps: list[StepResult]

    def table(self) -> str:
        mode = "unary" if not self.streaming else "streaming"
        lines = [
            f"{self.target} model {self.model!r}: input {self.input_name!r} {self.datatype} {list(self.shape)}, {mode}",
            f"{'load':>12} {'rps':>10} {'rows/s':>11} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'ok':>8}  errors",
        ]
        for step in self.steps:
            load = f"{step.load:g}/s" if step.mode == "rate" else f"c={step.load:g}"
            errors = ", ".join(f"{name} {count}" for name, count in sorted(step.errors.items())) or "-"
            lines.append(
                f"{load:>12} {step.rps:>10.1f} {step.rows_per_second:>11.1f} {_ms(step.p50_ms):>9} "
                f"{_ms(step.p90_ms):>9} {_ms(step.p99_ms):>9} {step.ok:>8}  {errors}"
            )
        return "\n".join(lines)

    def write_csv(self, path: Path) -> None:
        columns = ["mode", "load", "rows_per_request", "seconds", "ok", "failed", "rps", "rows_per_second"]
        columns += ["p50_ms", "p90_ms", "p99_ms", "mean_ms", "errors"]
        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, columns)
            writer.writeheader()
            for step in self.steps:
                row = step.as_dict()
                row["errors"] = ";".join(f"{name}={count}" for name, count in sorted(step.errors.items()))
                writer.writerow(row)

    def write_json(self, path: Path) -> None:
        document = {**asdict(self), "steps": [step.as_dict() for step in self.steps]}
        path.write_text(json.dumps(document, indent=2) + "\n")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def parse_parameter(text: str) -> tuple[str, ParameterValue]:
    """NAME=VALUE, typed by its look (true/false, an integer, a number, else a string),
    or NAME:TYPE=VALUE with TYPE one of bool, int, float, string."""
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise ValueError(f"{text!r} is not NAME=VALUE")
    name, colon, kind = name.partition(":")
    if colon:
        return name, _typed(value, kind)
    for guess in ("bool", "int", "float"):
        try:
            return name, _typed(value, guess)
        except ValueError:
            continue
    return name, value


def _typed(value: str, kind: str) -> ParameterValue:
    if kind == "bool":
        if value.lower() not in ("true", "false"):
            raise ValueError(f"{value!r} is not true or false")
        return value.lower() == "true"
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "string":
        return value
    raise ValueError(f"type {kind!r} is not bool, int, float or string")


async def prepare_payloads(options: BenchOptions) -> Payloads:
    """Encode the requests once, asking the server for the model's input only for what was not given."""
    given_all = options.input_name is not None and (
        options.data is not None or (options.shape is not None and options.datatype is not None)
    )
    name, datatype, shape = options.input_name, options.datatype, options.shape
    if not given_all:
        name, declared_type, declared_shape = await _declared_input(options)
        datatype = datatype or declared_type
        shape = shape or declared_shape
    assert name is not None
    if datatype is not None and datatype not in DATATYPES:
        raise ConfigurationError(f"datatype {datatype!r} is not one of {sorted(DATATYPES)}")
    if options.data is not None:
        arrays = _rows_from_file(options.data, options.rows or 1, datatype)
    else:
        assert datatype is not None
        assert shape is not None
        arrays = _random_arrays(datatype, _concrete(shape, options.rows), options.seed)
    datatype = datatype or datatype_for(arrays[0])
    requests = [
        request_to_pb(
            InferRequest(
                options.model,
                [Tensor.of(name, array, datatype)],
                options.model_version,
                parameters=dict(options.parameters),
            )
        ).SerializeToString()
        for array in arrays
    ]
    return Payloads(name, datatype, tuple(int(dim) for dim in arrays[0].shape), requests)


async def _declared_input(options: BenchOptions) -> tuple[str, str, tuple[int, ...]]:
    async with OipClient(options.target, options.max_message_bytes) as client:
        try:
            metadata = await client.model_metadata(options.model, options.model_version, timeout=options.timeout)
        except UpstreamError as exc:
            raise ConfigurationError(
                f"cannot read model {options.model!r}'s metadata ({exc}); give --input, --datatype and --shape "
                "(or --data) to run without it"
            ) from exc
    inputs = {spec.name: spec for spec in metadata.inputs}
    if options.input_name is not None:
        spec = inputs.get(options.input_name)
        if spec is None:
            raise ConfigurationError(f"model {options.model!r} has no input {options.input_name!r}: {sorted(inputs)}")
    elif len(inputs) == 1:
        spec = next(iter(inputs.values()))
    else:
        raise ConfigurationError(
            f"model {options.model!r} has inputs {sorted(inputs)}; bench sends one, name it with --input"
        )
    return spec.name, spec.datatype, tuple(spec.shape)


def _concrete(shape: tuple[int, ...], rows: int | None) -> tuple[int, ...]:
    """The request's shape: the first dimension is the rows (default 1 where the model leaves it open)."""
    if not shape:
        raise ConfigurationError("the input is a scalar; bench needs a shape with a batch dimension")
    first = rows if rows is not None else (shape[0] if shape[0] >= 0 else 1)
    rest = shape[1:]
    if any(dim < 0 for dim in rest):
        raise ConfigurationError(f"the input's shape {list(shape)} has open dimensions; give one with --shape")
    return (first, *rest)


def _random_arrays(datatype: str, shape: tuple[int, ...], seed: int) -> list[npt.NDArray[Any]]:
    spec = DATATYPES[datatype]
    rng = np.random.default_rng(seed)
    elements = math.prod(shape)
    count = max(1, min(RANDOM_PAYLOADS, MAX_PREPARED_BYTES // max(1, elements * max(spec.itemsize, 8))))

    def one() -> npt.NDArray[Any]:
        if datatype == "BYTES":
            values = np.empty(elements, dtype=object)
            values[:] = [rng.bytes(8) for _ in range(elements)]
            return values.reshape(shape)
        if datatype == "BF16":  # bit patterns: the top half of float32 values
            return (rng.standard_normal(shape, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
        if spec.dtype.kind == "f":
            return rng.standard_normal(shape).astype(spec.dtype)
        if spec.dtype.kind == "b":
            return rng.integers(0, 2, shape).astype(bool)
        return rng.integers(0, 100, shape).astype(spec.dtype)

    return [one() for _ in range(count)]


def _rows_from_file(path: Path, rows: int, datatype: str | None) -> list[npt.NDArray[Any]]:
    try:
        with np.load(path) as data:
            inputs = data["inputs"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigurationError(f"{path}: cannot read the 'inputs' array of an .npz ({exc})") from exc
    if inputs.ndim == 0 or len(inputs) < rows:
        raise ConfigurationError(f"{path}: 'inputs' has {len(inputs) if inputs.ndim else 0} rows, fewer than {rows}")
    if datatype is not None and datatype not in ("BYTES", "BF16"):  # BF16: the file holds the bit patterns
        inputs = inputs.astype(DATATYPES[datatype].dtype)
    fits = max(1, MAX_PREPARED_BYTES // max(1, inputs[:rows].nbytes))
    return [inputs[start : start + rows] for start in range(0, len(inputs) - rows + 1, rows)][:fits]


async def _probe(transport: Transport, payloads: Payloads, options: BenchOptions) -> None:
    """A request or two first, so a server that cannot take the load at all gets a clear message, not a table
    of errors. A stream must answer two requests in a row: Triton's stream lasts, MLServer's ModelStreamInfer
    (one generation per stream, plain ModelInferResponse answers) does not."""
    send = transport.sender(0)
    status = await send(payloads.requests[0])
    if status == "UNIMPLEMENTED":
        rpc = "ModelStreamInfer (Triton's bidirectional stream)" if options.streaming else "ModelInfer"
        raise ConfigurationError(f"{options.target} does not implement {rpc}; is it an OIP (KServe v2) server?")
    if status == "UNAVAILABLE":
        raise ConfigurationError(f"nothing answers at {options.target} (UNAVAILABLE): is the server running?")
    if isinstance(transport, StreamTransport):
        if status == OK:
            status = await send(payloads.requests[0])
        if status != OK:
            raise ConfigurationError(
                f"{options.target}'s ModelStreamInfer did not answer two requests in a row ({status}: "
                f"{transport.last_error(0)!r}); --streaming needs Triton's lasting stream of "
                "ModelStreamInferResponse answers (MLServer's stream, one generation each, is not that)"
            )


@contextlib.asynccontextmanager
async def _progress(options: BenchOptions, label: str, began: int, window: Window | None) -> AsyncIterator[None]:
    """A progress bar on stderr (time into the step; counts when this process sends) while the step runs."""
    total = options.warmup + options.duration

    async def tick(bar: tqdm[Any]) -> None:
        while True:
            await asyncio.sleep(PROGRESS_SECONDS)
            bar.n = min(total, round(max(0, time.perf_counter_ns() - began) / 1e9, 1))
            if window is not None:
                bar.set_postfix(ok=len(window.latencies), failed=sum(window.errors.values()), refresh=False)
            bar.refresh()

    with tqdm(total=total, desc=label, unit="s", disable=None if options.progress else True) as bar:
        ticker = asyncio.create_task(tick(bar))
        try:
            yield
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker


async def run_bench(options: BenchOptions) -> BenchReport:
    """Every step of options against options.target; raises ConfigurationError for what cannot run at all."""
    payloads = await prepare_payloads(options)
    connection = options.connection
    async with connected(connection) as transport:
        await _probe(transport, payloads, options)
        if options.processes == 1:
            results = [await _step(options, payloads, mode, load, transport, None) for mode, load in options.steps]
        else:
            clients = ClientProcesses(connection, payloads.requests, options.processes)
            try:
                await clients.ready()
                results = [await _step(options, payloads, mode, load, None, clients) for mode, load in options.steps]
            finally:
                clients.close()
    return BenchReport(
        options.target,
        options.model,
        payloads.input_name,
        payloads.datatype,
        payloads.shape,
        options.streaming,
        results,
    )


async def _step(
    options: BenchOptions,
    payloads: Payloads,
    mode: str,
    load: float,
    transport: Transport | None,
    clients: ClientProcesses | None,
) -> StepResult:
    """One step, sent from this process (transport) or from the client processes."""
    # Client processes need a moment to get the step before it begins.
    began = time.perf_counter_ns() + (0 if clients is None else round(STEP_NOTICE_SECONDS * 1e9))
    start = began + round(options.warmup * 1e9)
    step = Step(mode, load, began, start, start + round(options.duration * 1e9), options.min_requests)
    label = f"rate {load:g}/s" if mode == "rate" else f"concurrency {load:g}"
    if clients is None:
        assert transport is not None
        window = step.window()
        async with _progress(options, label, began, window):
            await drive(transport, payloads.requests, step, options.channels, window)
    else:
        async with _progress(options, label, began, None):
            # A step waiting for min_requests can last longer; until then, a process that stays silent has failed.
            longest = STEP_NOTICE_SECONDS + options.warmup + options.duration + options.timeout + 60
            longest += options.min_requests * options.timeout
            window = await clients.run(step, longest)
    return step_result(window, mode, load, payloads.rows)


def step_result(window: Window, mode: str, load: float, rows: int) -> StepResult:
    seconds = (window.end - window.start) / 1e9
    p50 = p90 = p99 = mean = None
    if window.latencies:
        milliseconds = np.asarray(window.latencies, dtype=np.float64) / 1e6
        p50, p90, p99 = (float(value) for value in np.percentile(milliseconds, [50, 90, 99]))
        mean = float(milliseconds.mean())
    return StepResult(mode, load, rows, seconds, len(window.latencies), dict(window.errors), p50, p90, p99, mean)


def bench_command(options: BenchOptions, csv_path: Path | None = None, json_path: Path | None = None) -> int:
    """`offload bench`: run, print the table, write the files; exit status 1 when any request failed."""
    report = asyncio.run(run_bench(options))
    print(report.table())
    if csv_path is not None:
        report.write_csv(csv_path)
    if json_path is not None:
        report.write_json(json_path)
    return 1 if any(step.failed for step in report.steps) else 0
