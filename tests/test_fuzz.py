"""Hostile input, fuzzed: seeded, structurally mutated ModelInferRequests against both real servers.

The servers are the real commands as child processes: `offload cloud`, and `offload edge`
pointed at it, so that rows the edge routes to the cloud do cross the network. Their
repository holds the demo model and the echo models (every datatype, BYTES included).

Each request starts from a well-formed one for a model the server describes (its
ModelMetadata), then a seeded RNG mutates its structure: ids, model names, input names
and parameter keys and values that are empty, control characters, 100,000 characters
long, or not UTF-8 at all (written into the serialized bytes, where protobuf's own API
cannot put them); shapes negative, huge, zero or of the wrong rank; datatypes of other
tensors or unknown; raw and typed contents of the wrong size, in the wrong field or both;
every parameter type, routing parameters included; requested outputs; now and then the
message's bytes cut short or flipped. The requests go out concurrently through the raw
gRPC stub's method (bytes on the wire), so nothing on the client side tidies them up.

Every answer must be OK or a documented refusal (INVALID_ARGUMENT, NOT_FOUND,
RESOURCE_EXHAUSTED), never INTERNAL or UNKNOWN, and a refusal must say why. An OK answer
from the edge is never degraded: its cloud is healthy, so a degraded answer is a cloud call
the edge itself broke (as an id copied into the x-request-id header once did). Afterwards
both servers answer a valid request correctly, and their resident memory (VmRSS) grew by
no more than a generous bound over the measured round, after a warm-up round.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.internal.containers import MessageMap

from conftest import Processes, start_processes
from offload.models import DEMO_REPOSITORY
from offload.oip import grpc_service_pb2 as pb
from offload.oip import grpc_service_pb2_grpc as pb_grpc
from offload.oip.datatypes import DATATYPES
from offload.oip.limits import MAX_MESSAGE_BYTES, channel_options
from offload.tools.process import ServerProcess
from support.repos import write_echo_repository

Code = grpc.StatusCode
# Fixed, so that every run sends the same requests; OFFLOAD_FUZZ_SEED explores others.
SEED = int(os.environ.get("OFFLOAD_FUZZ_SEED", "20261201"))
WARM_UP = 500  # requests per server before the memory baseline (pools, caches and allocator arenas settle)
MEASURED = 2000  # requests per server while memory is watched
CONCURRENCY = 8
TIMEOUT = 60.0
ALLOWED = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED}
# RESOURCE_EXHAUSTED has two documented causes: a message over the size limit, and a cloud at capacity.
# gRPC also uses it when a status's trailer is over the client's metadata limit, which is our bug.
EXHAUSTED_BECAUSE = ("larger than max", "at capacity")
# Generous: a leak of even 50 KB per request (a kept 100,000-character string) would pass it twice over.
RSS_GROWTH_LIMIT_BYTES = 64 * 1024 * 1024

INFER = "/inference.GRPCInferenceService/ModelInfer"

# Written into strings as a placeholder and swapped, in the serialized bytes, for as many bytes that
# are not UTF-8 (a lone continuation byte, an overlong NUL, an encoded surrogate, a 5-byte lead):
# protobuf's Python API refuses to build such a string, a hostile client in another language does not.
NOT_UTF8_MARKER = b"~not-utf8~"
NOT_UTF8 = b"\xff\xfe\xc0\x80\xed\xa0\x80\xf8\x88\x80"
assert len(NOT_UTF8) == len(NOT_UTF8_MARKER)
LENGTH = struct.Struct("<I")
ROUTING_KEYS = ["offload_threshold", "offload_route", "offload_details", "offload_require_cloud", "offload_nope"]


@dataclass(frozen=True)
class Spec:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Model:
    name: str
    inputs: tuple[Spec, ...]
    outputs: tuple[str, ...]


class Fuzzer:
    """Builds one hostile ModelInferRequest after another, as bytes, from one seed."""

    def __init__(self, seed: int, models: list[Model], edge: bool) -> None:
        self.rng = random.Random(seed)
        self.models = models
        self.edge = edge
        self.clean = False

    def chance(self, probability: float) -> bool:
        return self.rng.random() < probability

    def mutate(self, probability: float) -> bool:
        """Whether to break the request's structure here; never in a request drawn to stay well formed."""
        return not self.clean and self.chance(probability)

    def hostile(self) -> str:
        rng = self.rng
        makers: list[Callable[[], str]] = [
            lambda: "",
            lambda: "\n" * 50,
            lambda: "".join(chr(rng.randrange(32)) for _ in range(rng.randint(1, 40))),
            lambda: rng.choice("xé\n%😀") * rng.choice([300, 5000, 100_000]),
            lambda: "naïve-日本-😀\u2028\u202e\ufeff\x7f\x85",
            lambda: "%s%n{0}${x}'\"\\",
            lambda: "../../etc/passwd\x00.onnx",
            NOT_UTF8_MARKER.decode,
            lambda: " padded ",
            lambda: "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randint(1, 200))),
        ]
        return rng.choice(makers)()

    def text(self) -> str:
        """A hostile string for a field where OIP allows any text: UTF-8 in a request drawn to stay well formed."""
        text = self.hostile()
        return text.replace(NOT_UTF8_MARKER.decode(), "x") if self.clean else text

    def request(self) -> bytes:
        # Some requests stay well formed but for what OIP allows anyway (any id, any extra parameter),
        # so that they run: through the codec, the models and, from the edge, the cloud.
        self.clean = self.chance(0.45)
        model = self.rng.choice(self.models)
        message = pb.ModelInferRequest(model_name=self.hostile() if self.mutate(0.1) else model.name)
        if self.mutate(0.1):
            message.model_version = self.rng.choice(["1", "2", self.hostile()])
        if self.chance(0.6):
            message.id = self.text() if self.chance(0.8) else f"req-{self.rng.randrange(10**6)}"
        self._inputs(message, model)
        self._parameters(message.parameters, routing=self.edge)
        if self.mutate(0.15):
            self._outputs(message, model)
        data = message.SerializeToString().replace(NOT_UTF8_MARKER, NOT_UTF8)
        return self._damaged(data) if self.mutate(0.05) else data

    def _inputs(self, message: pb.ModelInferRequest, model: Model) -> None:
        rows = self.rng.choice([1, 2, 3, 5])
        raw = self.chance(0.7)
        specs = list(model.inputs)
        if self.mutate(0.05) and specs:
            specs.pop(self.rng.randrange(len(specs)))
        if self.mutate(0.05):
            specs.append(self.rng.choice([*specs, Spec(self.hostile(), "FP32", (-1, 2))]))
        for spec in specs:
            tensor = message.inputs.add(name=self.hostile() if self.mutate(0.05) else spec.name)
            tensor.datatype = self._datatype() if self.mutate(0.08) else spec.datatype
            shape = [rows, *(dim if dim > 0 else self.rng.randint(1, 4) for dim in spec.shape[1:])]
            tensor.shape.extend(self._shape(shape) if self.mutate(0.1) else shape)
            count = _elements(tensor.shape)
            if raw:
                payload = self._raw(tensor.datatype, count)
                if self.mutate(0.06):  # cut, then a few stray bytes: almost never the size the shape needs
                    payload = payload[: self.rng.randrange(len(payload) + 1)] + self.rng.randbytes(
                        self.rng.randint(0, 9)
                    )
                message.raw_input_contents.append(payload)
                if self.mutate(0.03):
                    self._typed(tensor.contents, tensor.datatype, count)  # both kinds of contents
            else:
                self._typed(tensor.contents, tensor.datatype, count)
            if self.chance(0.05):
                self._parameters(tensor.parameters, routing=False)
        if raw and self.mutate(0.04):
            if message.raw_input_contents and self.chance(0.5):
                del message.raw_input_contents[-1]
            else:
                message.raw_input_contents.append(self.rng.randbytes(8))

    def _datatype(self) -> str:
        return self.rng.choice([*DATATYPES, "FP8", "", "fp32", "STRING", self.hostile()])

    def _shape(self, shape: list[int]) -> list[int]:
        rng = self.rng
        mutated = list(shape)
        choice = rng.randrange(6)
        if choice == 0:
            mutated[rng.randrange(len(mutated))] = rng.choice([-1, -(2**63), -7])
        elif choice == 1:
            mutated[rng.randrange(len(mutated))] = rng.choice([2**31, 2**40, 2**62, 2**63 - 1])
        elif choice == 2:
            mutated[rng.randrange(len(mutated))] = 0
        elif choice == 3:
            mutated.append(rng.randint(1, 3))
        elif choice == 4:
            mutated = mutated[:-1]
        else:
            mutated = [2**62, 0]
        return mutated

    def _raw(self, datatype: str, count: int | None) -> bytes:
        if count is None or count > 4096:
            return self.rng.randbytes(self.rng.randint(0, 64))
        if datatype == "BYTES":
            items = [self._bytes_item() for _ in range(count)]
            return b"".join(LENGTH.pack(len(item)) + item for item in items)
        if datatype == "BOOL":
            return bytes(2 if self.mutate(0.03) else self.rng.choice([0, 1]) for _ in range(count))
        spec = DATATYPES.get(datatype)
        return self.rng.randbytes(count * (spec.itemsize if spec else 4))

    def _bytes_item(self) -> bytes:
        if self.mutate(0.1):  # the edge model (ONNX Runtime) takes UTF-8 text only
            return NOT_UTF8
        return self.rng.choice(["", "text", "naïve", "x" * 50]).encode()

    def _typed(self, contents: pb.InferTensorContents, datatype: str, count: int | None) -> None:
        spec = DATATYPES.get(datatype)
        field = spec.contents_field if spec and spec.contents_field and not self.mutate(0.07) else None
        if field is None:
            field = self.rng.choice([field.name for field in pb.InferTensorContents.DESCRIPTOR.fields])
        fits = count is not None and count <= 4096 and not self.mutate(0.07)
        size = count if fits and count is not None else self.rng.randint(0, 20)
        rng, wide = self.rng, not self.clean  # values outside a narrow datatype's range only when breaking things
        generate: dict[str, Callable[[], object]] = {
            "bool_contents": lambda: rng.random() < 0.5,
            "int_contents": lambda: rng.choice([0, 1, -1, 127, 300, -(2**31), 2**31 - 1] if wide else [0, 1]),
            "int64_contents": lambda: rng.choice([0, 5, -(2**63), 2**63 - 1]),
            "uint_contents": lambda: rng.choice([0, 1, 255, 65536, 2**32 - 1] if wide else [0, 1]),
            "uint64_contents": lambda: rng.choice([0, 1, 2**64 - 1]),
            "fp32_contents": lambda: rng.choice([0.0, 0.5, -1.0, float("nan"), float("inf"), 3.4e38]),
            "fp64_contents": lambda: rng.choice([0.0, 1e-300, float("-inf"), 1e300]),
            "bytes_contents": self._bytes_item,
        }
        getattr(contents, field).extend(generate[field]() for _ in range(size))

    def _parameters(self, parameters: MessageMap[str, pb.InferParameter], routing: bool) -> None:
        for _ in range(self.rng.choice([0, 0, 1, 2, 4])):
            if routing and self.mutate(0.6):
                key = self.rng.choice(ROUTING_KEYS)
            else:
                # Any other key and value are fine (forwarded to the cloud).
                key = self.rng.choice(["priority", "binary_data", "sequence_id", self.text()])
            self._parameter_value(parameters[key], key)
        if routing and self.chance(0.5):
            # Rows short of certainty go to the cloud, so that routed rows do cross the network.
            parameters["offload_threshold"].double_param = 1.0

    def _parameter_value(self, parameter: pb.InferParameter, key: str) -> None:
        rng = self.rng
        choice = rng.randrange(7)
        if choice == 0:
            parameter.bool_param = rng.random() < 0.5
        elif choice == 1:
            parameter.int64_param = rng.choice([0, 1, -1, 2**63 - 1, -(2**63)])
        elif choice == 2:
            good = {"offload_route": ["auto", "edge", "cloud"], "offload_threshold": ["0.5", "1"]}.get(key, [])
            parameter.string_param = rng.choice(good) if good and self.chance(0.5) else self.text()
        elif choice == 3:
            parameter.double_param = rng.choice([0.0, 0.5, 1.0, -0.1, 2.0, float("nan"), float("inf"), 1e308])
        elif choice == 4 or self.clean:
            parameter.uint64_param = rng.choice([0, 1, 2**64 - 1])
        else:
            parameter.SetInParent()  # on the wire, but nothing set in the oneof

    def _outputs(self, message: pb.ModelInferRequest, model: Model) -> None:
        for _ in range(self.rng.randint(1, 3)):
            output = message.outputs.add(name=self.rng.choice([*model.outputs, self.hostile()]))
            if self.chance(0.3):
                parameter = output.parameters[self.rng.choice(["binary_data", "classification", self.hostile()])]
                self._parameter_value(parameter, "")

    def _damaged(self, data: bytes) -> bytes:
        if not data or self.chance(0.5):
            return data[: self.rng.randrange(len(data) + 1)]
        position = self.rng.randrange(len(data))
        return data[:position] + bytes([data[position] ^ (1 << self.rng.randrange(8))]) + data[position + 1 :]


def _elements(shape: Iterable[int]) -> int | None:
    """Elements of a shape, or None where it has no sensible payload (negative or huge)."""
    dims = list(shape)
    if any(dim < 0 for dim in dims):
        return None
    count = 1
    for dim in dims:
        count *= dim
    return count if count <= 1 << 20 else None


@dataclass
class Outcome:
    codes: Counter[str]
    problems: list[str]
    routed_to_cloud: int = 0


@pytest.fixture(scope="module")
def fuzzed_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    """The real commands over the demo and echo models; a long cloud deadline, so that no load on this
    machine can make a routed row degrade for want of time (a degraded answer is a finding here)."""
    repository = write_echo_repository(tmp_path_factory.mktemp("fuzz-repository"))
    shutil.copytree(DEMO_REPOSITORY / "digits", repository / "digits")
    processes = start_processes(repository, edge_args=["--cloud-timeout-seconds", "60", "--log-level", "WARNING"])
    yield processes
    processes.edge.kill()
    processes.cloud.kill()


async def _models(stub: pb_grpc.GRPCInferenceServiceAsyncStub, names: list[str]) -> list[Model]:
    models = []
    for name in names:
        metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=TIMEOUT)
        inputs = tuple(Spec(t.name, t.datatype, tuple(t.shape)) for t in metadata.inputs)
        models.append(Model(name, inputs, tuple(t.name for t in metadata.outputs)))
    return models


async def _fuzz(channel: grpc.aio.Channel, requests: list[bytes], edge: bool) -> Outcome:
    infer: grpc.aio.UnaryUnaryMultiCallable[bytes, pb.ModelInferResponse] = channel.unary_unary(
        INFER, response_deserializer=pb.ModelInferResponse.FromString
    )
    outcome = Outcome(Counter(), [])
    queue = iter(enumerate(requests))

    async def worker() -> None:
        for index, data in queue:
            try:
                reply = await infer(data, timeout=TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
                outcome.codes[code.name] += 1
                documented = code != Code.RESOURCE_EXHAUSTED or any(why in details for why in EXHAUSTED_BECAUSE)
                if code not in ALLOWED or not documented:
                    outcome.problems.append(f"request {index}: {code.name}: {details[:300]!r}")
                elif not details.strip():
                    outcome.problems.append(f"request {index}: {code.name} with an empty message")
                continue
            outcome.codes["OK"] += 1
            if edge:
                if reply.parameters["offload_degraded"].bool_param:
                    outcome.problems.append(f"request {index}: degraded although the cloud is healthy")
                if reply.parameters["offload_offloaded_rows"].int64_param > 0:
                    outcome.routed_to_cloud += 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return outcome


def _rss_bytes(process: ServerProcess) -> int:
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {process.pid}")


async def _valid_request_is_answered(channel: grpc.aio.Channel, edge: bool) -> None:
    with np.load(DEMO_REPOSITORY / "digits" / "test.npz") as data:
        pixels, labels = data["inputs"][:4].astype(np.float32), data["labels"][:4]
    request = pb.ModelInferRequest(model_name="digits", id="after-the-fuzz")
    request.inputs.add(name="pixels", datatype="FP32", shape=[4, 64])
    request.raw_input_contents.append(pixels.tobytes())
    if edge:
        request.parameters["offload_threshold"].double_param = 1.0
    reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=TIMEOUT)
    scores = np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(4, 10)
    assert scores.argmax(axis=1).tolist() == labels.tolist()
    assert reply.id == "after-the-fuzz"
    if edge:
        assert reply.parameters["offload_route"].string_param == "cloud"
        assert not reply.parameters["offload_degraded"].bool_param


@pytest.mark.timeout(600)
async def test_hostile_requests_get_documented_statuses_and_the_servers_stay_well(
    fuzzed_processes: Processes,
) -> None:
    servers = {"edge": fuzzed_processes.edge, "cloud": fuzzed_processes.cloud}
    names = {"edge": ["digits", "echo", "echo_typed"], "cloud": ["digits", "echo", "echo_all", "echo_typed"]}
    channels = {
        server: grpc.aio.insecure_channel(process.address, options=channel_options(MAX_MESSAGE_BYTES))
        for server, process in servers.items()
    }
    try:
        fuzzers = {
            server: Fuzzer(
                SEED + offset, await _models(pb_grpc.GRPCInferenceServiceStub(channel), names[server]), server == "edge"
            )
            for offset, (server, channel) in enumerate(channels.items())
        }
        warm_up = {server: [fuzzer.request() for _ in range(WARM_UP)] for server, fuzzer in fuzzers.items()}
        measured = {server: [fuzzer.request() for _ in range(MEASURED)] for server, fuzzer in fuzzers.items()}

        async def round_of(requests: dict[str, list[bytes]]) -> dict[str, Outcome]:
            outcomes = await asyncio.gather(
                *(_fuzz(channels[server], requests[server], server == "edge") for server in servers)
            )
            return dict(zip(servers, outcomes, strict=True))

        logged_before = {server: process.output() for server, process in servers.items()}
        first = await round_of(warm_up)
        before = {server: _rss_bytes(process) for server, process in servers.items()}
        second = await round_of(measured)
        after = {server: _rss_bytes(process) for server, process in servers.items()}

        for server in servers:
            problems = first[server].problems + second[server].problems
            codes = first[server].codes + second[server].codes
            print(f"{server}: {dict(codes)}; VmRSS {before[server] / 2**20:.1f} -> {after[server] / 2**20:.1f} MiB")
            assert problems == [], (
                f"{server}: {len(problems)} problems, e.g.\n" + "\n".join(problems[:15]) + "\n"
                f"its output ends:\n{servers[server].output()[-6000:]}"
            )
            # The fuzz reached past the checks: many requests ran, and at the edge many crossed to the cloud.
            assert codes["OK"] >= (WARM_UP + MEASURED) // 5, f"{server}: {codes}"
            assert codes["INVALID_ARGUMENT"] >= (WARM_UP + MEASURED) // 5, f"{server}: {codes}"
            assert codes["NOT_FOUND"] > 0, f"{server}: {codes}"
            growth = after[server] - before[server]
            assert growth <= RSS_GROWTH_LIMIT_BYTES, (
                f"{server}: resident memory grew by {growth / 2**20:.1f} MiB over {MEASURED} hostile requests "
                f"({before[server] / 2**20:.1f} -> {after[server] / 2**20:.1f} MiB)"
            )
        for server, process in servers.items():
            # Nothing logged while fuzzed: no error, and so no log line a hostile string could have forged.
            assert process.output() == logged_before[server], f"{server} logged:\n{process.output()[-6000:]}"
        routed = first["edge"].routed_to_cloud + second["edge"].routed_to_cloud
        assert routed >= (WARM_UP + MEASURED) // 10, f"only {routed} edge answers had rows from the cloud"

        for server, channel in channels.items():
            await _valid_request_is_answered(channel, server == "edge")
    finally:
        for channel in channels.values():
            await channel.close()
