"""TLS, mutual TLS and bearer tokens: on the generic server and client, and end to end through the real commands.

Certificates are made here (tests/support/certs.py): a trusted CA that signs the
servers' and clients' certificates, and another CA whose client certificate must be refused.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import SUBPROCESS_ENV
from offload.cloud.dataplane import CloudDataPlane
from offload.cloud.settings import CloudSettings
from offload.edge.settings import EdgeSettings
from offload.models import DEMO_REPOSITORY
from offload.oip.client import OipClient
from offload.oip.errors import ConfigurationError, UpstreamError
from offload.oip.security import TOKEN_RELOAD_SECONDS, ChannelSecurity, ServerSecurity, TokenFile
from offload.oip.server import SERVICE_NAME, OipServer
from offload.oip.settings import load_settings
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest
from offload.router.core import Router
from offload.router.models import RoutedModel
from offload.router.options import REQUIRE_CLOUD, RESPONSE_DEGRADED, RESPONSE_ROUTE, ROUTE
from offload.router.pool import CloudPool
from offload.tools.cli import main
from offload.tools.process import ServerProcess
from support.certs import CertificateAuthority, Pair

TOKEN = "s3cret-token-for-the-tests"
WRONG_TOKEN = "not-the-token-at-all"
TIMEOUT = 30.0


@dataclass(frozen=True)
class Pki:
    """The files every test here uses."""

    ca: Path  # the trusted CA: signs the server and the client certificates
    server: Pair  # valid for localhost and 127.0.0.1
    client: Pair
    other_ca: Path  # an unrelated CA
    other_client: Pair  # signed by the unrelated CA
    named_server: Pair  # valid only for cloud.internal (needs a server-name override on 127.0.0.1)
    encrypted: Pair  # a server certificate whose key is encrypted with a passphrase
    tokens: Path  # the server's accepted tokens (a comment, a blank line, two tokens)
    token: Path  # the client's token
    wrong_token: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    trusted = CertificateAuthority(folder, "trusted")
    other = CertificateAuthority(folder, "other")
    tokens = folder / "tokens"
    tokens.write_text(f"# accepted callers\n\nan-older-token\n  {TOKEN}  \n")
    token = folder / "token"
    token.write_text(f"{TOKEN}\n")
    wrong_token = folder / "wrong-token"
    wrong_token.write_text(f"{WRONG_TOKEN}\n")
    return Pki(
        ca=trusted.cert,
        server=trusted.issue("server", server=True),
        client=trusted.issue("device-1", server=False),
        other_ca=other.cert,
        other_client=other.issue("intruder", server=False),
        named_server=trusted.issue("named", server=True, names=["cloud.internal"]),
        encrypted=trusted.issue("encrypted", server=True, password=b"passphrase"),
        tokens=tokens,
        token=token,
        wrong_token=wrong_token,
    )


class FakeClock:
    """A monotonic clock the test moves, so a token file's reload interval needs no waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _request() -> InferRequest:
    return InferRequest("digits", [Tensor.of("pixels", np.zeros((3, 64), dtype=np.float32))])


@asynccontextmanager
async def serving(plane: CloudDataPlane, security: ServerSecurity) -> AsyncIterator[str]:
    server = OipServer(plane, "secure-cloud", security=security)
    port = await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def _infer_status(address: str, security: ChannelSecurity | None) -> grpc.StatusCode:
    """OK with a well-formed answer, or the status the call failed with."""
    async with OipClient(address, security=security) as client:
        try:
            answer = await client.infer(_request(), timeout=TIMEOUT)
        except UpstreamError as exc:
            return exc.status
    assert answer.outputs[0].shape == (3, 10)
    return grpc.StatusCode.OK


# --- TLS and mutual TLS on the generic server and client --------------------------------------------------------------


async def test_tls_serves_a_client_that_verifies_the_server_and_refuses_plaintext(
    demo_cloud_plane: CloudDataPlane, pki: Pki
) -> None:
    security = ServerSecurity.load(pki.server.cert, pki.server.key)
    assert security.description == "TLS, no token"
    async with serving(demo_cloud_plane, security) as address:
        assert await _infer_status(address, ChannelSecurity.load(ca=pki.ca)) == grpc.StatusCode.OK
        # Plaintext to the TLS port gets no answer, never a silent downgrade.
        assert await _infer_status(address, None) == grpc.StatusCode.UNAVAILABLE
        # A client that trusts another CA does not accept this server.
        assert await _infer_status(address, ChannelSecurity.load(ca=pki.other_ca)) == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_serves_a_client_certificate_of_its_ca_and_refuses_others_and_none(
    demo_cloud_plane: CloudDataPlane, pki: Pki
) -> None:
    security = ServerSecurity.load(pki.server.cert, pki.server.key, pki.ca)
    assert security.description == "mutual TLS (client certificates required), no token"
    async with serving(demo_cloud_plane, security) as address:
        device = ChannelSecurity.load(ca=pki.ca, cert=pki.client.cert, key=pki.client.key)
        assert await _infer_status(address, device) == grpc.StatusCode.OK
        intruder = ChannelSecurity.load(ca=pki.ca, cert=pki.other_client.cert, key=pki.other_client.key)
        assert await _infer_status(address, intruder) == grpc.StatusCode.UNAVAILABLE
        assert await _infer_status(address, ChannelSecurity.load(ca=pki.ca)) == grpc.StatusCode.UNAVAILABLE


async def test_server_name_override_checks_the_certificate_against_that_name(
    demo_cloud_plane: CloudDataPlane, pki: Pki
) -> None:
    async with serving(demo_cloud_plane, ServerSecurity.load(pki.named_server.cert, pki.named_server.key)) as address:
        # The certificate is for cloud.internal, not 127.0.0.1: without the override, no connection.
        assert await _infer_status(address, ChannelSecurity.load(ca=pki.ca)) == grpc.StatusCode.UNAVAILABLE
        named = ChannelSecurity.load(ca=pki.ca, server_name="cloud.internal")
        assert named.options() == [("grpc.ssl_target_name_override", "cloud.internal")]
        assert await _infer_status(address, named) == grpc.StatusCode.OK
        wrong_name = ChannelSecurity.load(ca=pki.ca, server_name="other.internal")
        assert await _infer_status(address, wrong_name) == grpc.StatusCode.UNAVAILABLE


async def test_a_pool_gives_every_replica_its_credentials_and_checks_dns_replicas_for_the_name(
    demo_cloud_plane: CloudDataPlane, pki: Pki
) -> None:
    """Two replicas with mutual TLS and tokens, whose certificate is for cloud.internal only."""
    server = ServerSecurity.load(pki.named_server.cert, pki.named_server.key, pki.ca, pki.tokens)
    device = ChannelSecurity.load(ca=pki.ca, cert=pki.client.cert, key=pki.client.key, token_file=pki.token)
    async with serving(demo_cloud_plane, server) as first, serving(demo_cloud_plane, server) as second:

        async def resolver(host: str, port: int) -> list[str]:
            assert (host, port) == ("cloud.internal", 8101)
            return [first, second]

        # Found by looking cloud.internal up: each replica's certificate is checked against that name.
        pool = CloudPool("dns:///cloud.internal:8101", TIMEOUT, 64 << 20, resolver=resolver, security=device)
        try:
            # Readiness is asked of each replica, over TLS, with the client certificate and the token.
            assert await pool.check_ready(TIMEOUT) is None
            assert {replica.target for replica in pool.replicas} == {first, second}
            answer = await pool.infer(_request(), deadline=None)
            assert answer.outputs[0].shape == (3, 10)
        finally:
            await pool.close()
        # The same addresses given as they are: the certificate is not for 127.0.0.1, so neither connects.
        pool = CloudPool(f"{first},{second}", TIMEOUT, 64 << 20, security=device)
        try:
            problem = await pool.check_ready(TIMEOUT)
            assert problem is not None
            assert f"{first}: UNAVAILABLE" in problem
            assert f"{second}: UNAVAILABLE" in problem
        finally:
            await pool.close()
        # Without the token, each replica refuses the look.
        untokened = ChannelSecurity.load(ca=pki.ca, cert=pki.client.cert, key=pki.client.key)
        pool = CloudPool("dns:///cloud.internal:8101", TIMEOUT, 64 << 20, resolver=resolver, security=untokened)
        try:
            problem = await pool.check_ready(TIMEOUT)
            assert problem is not None
            assert f"{first}: UNAUTHENTICATED" in problem
            assert f"{second}: UNAUTHENTICATED" in problem
        finally:
            await pool.close()


async def test_plaintext_beyond_loopback_is_served_with_a_warning(
    demo_cloud_plane: CloudDataPlane, caplog: pytest.LogCaptureFixture
) -> None:
    for host in ("127.0.0.1", "0.0.0.0"):
        server = OipServer(demo_cloud_plane, f"plaintext-on-{host}")
        await server.start(host)
        await server.stop(0)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "plaintext" in r.getMessage()]
    assert warnings == [
        "plaintext-on-0.0.0.0: serving plaintext on 0.0.0.0: anyone on the network can read the traffic; "
        "give tls_cert and tls_key for TLS"
    ]


# --- bearer tokens -------------------------------------------------------------------------------------------------


async def test_tokens_guard_inference_and_leave_health_and_reflection_open(
    demo_cloud_plane: CloudDataPlane, pki: Pki
) -> None:
    security = ServerSecurity.load(pki.server.cert, pki.server.key, auth_token_file=pki.tokens)
    assert security.description == "TLS, bearer token required"
    async with serving(demo_cloud_plane, security) as address:
        tls = ChannelSecurity.load(ca=pki.ca)
        assert await _infer_status(address, tls) == grpc.StatusCode.UNAUTHENTICATED
        wrong = ChannelSecurity.load(ca=pki.ca, token_file=pki.wrong_token)
        assert await _infer_status(address, wrong) == grpc.StatusCode.UNAUTHENTICATED
        right = ChannelSecurity.load(ca=pki.ca, token_file=pki.token)
        assert await _infer_status(address, right) == grpc.StatusCode.OK

        # Every method of the inference service is guarded, readiness and metadata included.
        async with OipClient(address, security=tls) as client:
            with pytest.raises(UpstreamError) as missing:
                await client.server_ready(timeout=TIMEOUT)
        assert missing.value.status == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer <token>" in str(missing.value)
        async with OipClient(address, security=wrong) as client:
            with pytest.raises(UpstreamError) as refused:
                await client.model_metadata("digits", timeout=TIMEOUT)
        assert refused.value.status == grpc.StatusCode.UNAUTHENTICATED
        assert WRONG_TOKEN not in str(refused.value)
        async with OipClient(address, security=right) as client:
            assert await client.server_ready(timeout=TIMEOUT)
            assert (await client.model_metadata("digits", timeout=TIMEOUT)).name == "digits"

        # Health and reflection answer without a token.
        credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes())
        async with grpc.aio.secure_channel(address, credentials) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", SERVICE_NAME):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            call = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            services = [service.name async for reply in call for service in reply.list_services_response.service]
        assert SERVICE_NAME in services


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (f"Basic {TOKEN}", "is not 'Bearer <token>'"),
        ("Bearer", "is not 'Bearer <token>'"),
        (f"Bearer {WRONG_TOKEN}", "not accepted"),
        (f"bearer {TOKEN}x", "not accepted"),
    ],
)
async def test_a_malformed_or_wrong_authorization_is_unauthenticated_and_never_echoed(
    demo_cloud_plane: CloudDataPlane, pki: Pki, value: str, message: str
) -> None:
    async with (
        serving(demo_cloud_plane, ServerSecurity.load(auth_token_file=pki.tokens)) as address,
        OipClient(address) as client,
    ):
        with pytest.raises(UpstreamError) as refused:
            await client.infer(_request(), timeout=TIMEOUT, metadata=(("authorization", value),))
    assert refused.value.status == grpc.StatusCode.UNAUTHENTICATED
    assert message in str(refused.value)
    assert TOKEN not in str(refused.value)
    assert WRONG_TOKEN not in str(refused.value)


async def test_the_bearer_scheme_is_case_insensitive(demo_cloud_plane: CloudDataPlane, pki: Pki) -> None:
    async with (
        serving(demo_cloud_plane, ServerSecurity.load(auth_token_file=pki.tokens)) as address,
        OipClient(address) as client,
    ):
        answer = await client.infer(_request(), timeout=TIMEOUT, metadata=(("authorization", f"bEaReR {TOKEN}"),))
    assert answer.outputs[0].shape == (3, 10)


async def test_a_changed_token_file_takes_effect_on_the_server_and_the_client(
    demo_cloud_plane: CloudDataPlane, tmp_path: Path
) -> None:
    accepted, sent = tmp_path / "accepted", tmp_path / "sent"
    accepted.write_text("first-token\n")
    sent.write_text("first-token\n")
    server_clock, client_clock = FakeClock(), FakeClock()
    security = ServerSecurity(tokens=TokenFile("auth_token_file", accepted, clock=server_clock))
    client_security = ChannelSecurity(token=TokenFile("cloud_token_file", sent, clock=client_clock))
    async with serving(demo_cloud_plane, security) as address:
        assert await _infer_status(address, client_security) == grpc.StatusCode.OK

        # Rotation: the server accepts a second token, the client moves to it, the first is retired.
        accepted.write_text("first-token\nsecond-token\n")
        server_clock.now += TOKEN_RELOAD_SECONDS
        sent.write_text("second-token\n")
        assert client_security.metadata() == (("authorization", "Bearer first-token"),)  # not looked at yet
        client_clock.now += TOKEN_RELOAD_SECONDS
        assert client_security.metadata() == (("authorization", "Bearer second-token"),)
        assert await _infer_status(address, client_security) == grpc.StatusCode.OK
        accepted.write_text("second-token\n")
        server_clock.now += TOKEN_RELOAD_SECONDS
        assert await _infer_status(address, client_security) == grpc.StatusCode.OK
        sent.write_text("first-token\n")
        client_clock.now += TOKEN_RELOAD_SECONDS
        assert await _infer_status(address, client_security) == grpc.StatusCode.UNAUTHENTICATED

        # A file that goes missing or holds no token keeps the tokens read before.
        accepted.unlink()
        server_clock.now += TOKEN_RELOAD_SECONDS
        sent.write_text("second-token\n")
        client_clock.now += TOKEN_RELOAD_SECONDS
        assert await _infer_status(address, client_security) == grpc.StatusCode.OK
        accepted.write_text("# emptied by mistake\n")
        server_clock.now += TOKEN_RELOAD_SECONDS
        assert await _infer_status(address, client_security) == grpc.StatusCode.OK


async def test_a_cloud_that_refuses_the_agent_leaves_rows_on_the_edge(
    demo_cloud_plane: CloudDataPlane,
    demo_edge_models: dict[str, RoutedModel],
    edge_executor: ThreadPoolExecutor,
    pki: Pki,
) -> None:
    """The router's view: a wrong token is a cloud failure; the edge answers, flagged degraded."""
    pixels = [Tensor.of("pixels", _pixels(4))]
    to_cloud = InferRequest("digits", pixels, parameters={ROUTE: "cloud"})
    cloud_required = InferRequest("digits", pixels, parameters={ROUTE: "cloud", REQUIRE_CLOUD: True})

    @asynccontextmanager
    async def router_sending(address: str, token: Path) -> AsyncIterator[Router]:
        endpoint = CloudPool(address, TIMEOUT, 64 << 20, security=ChannelSecurity.load(token_file=token))
        router = Router(demo_edge_models, endpoint, edge_executor, cache=None)
        try:
            yield router
        finally:
            await router.close()

    async with serving(demo_cloud_plane, ServerSecurity.load(auth_token_file=pki.tokens)) as address:
        async with router_sending(address, pki.wrong_token) as router:
            answer = await router.infer(to_cloud)
            assert answer.parameters[RESPONSE_ROUTE] == "edge"
            assert answer.parameters[RESPONSE_DEGRADED] is True
            # A caller who needs the cloud's answer learns why there is none.
            with pytest.raises(UpstreamError) as refused:
                await router.infer(cloud_required)
            assert "the bearer token was not accepted" in str(refused.value)
        async with router_sending(address, pki.token) as router:
            answer = await router.infer(cloud_required)
            assert answer.parameters[RESPONSE_ROUTE] == "cloud"
            assert answer.parameters[RESPONSE_DEGRADED] is False


def test_token_file_format(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# comment\n\n  one  \n\ttwo\n# three\n")
    tokens = TokenFile("auth_token_file", path)
    assert tokens.tokens() == (b"one", b"two")
    assert tokens.accepts(b"two")
    assert not tokens.accepts(b"three")
    assert not tokens.accepts(b"tw")
    path.write_text("good\nhas a space\n")
    with pytest.raises(ConfigurationError) as bad_line:
        TokenFile("auth_token_file", path)
    assert str(bad_line.value) == f"auth_token_file {path}: line 2 is not a token (visible ASCII, no spaces)"
    path.write_text("# only comments\n\n")
    with pytest.raises(ConfigurationError, match="holds no token"):
        TokenFile("auth_token_file", path)


# --- start-up checks -----------------------------------------------------------------------------------------------


def _unreadable(kind: str, folder: Path) -> Path:
    """A file that exists and cannot be read (as root too: a directory, a socket)."""
    path = folder / f"unreadable-{kind}"
    if kind == "directory":
        path.mkdir()
    elif kind == "socket":
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
        listener.close()
    else:
        path.write_text("-----BEGIN CERTIFICATE-----\n")
        path.chmod(0)
    return path


UNREADABLE = [
    "directory",
    "socket",
    pytest.param("no-permission", marks=pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")),
]


def test_missing_files_stop_start_up_naming_the_setting_and_the_file(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: ServerSecurity.load(missing, pki.server.key), f"tls_cert {missing} does not exist"),
        (lambda: ServerSecurity.load(pki.server.cert, missing), f"tls_key {missing} does not exist"),
        (
            lambda: ServerSecurity.load(pki.server.cert, pki.server.key, missing),
            f"tls_client_ca {missing} does not exist",
        ),
        (lambda: ServerSecurity.load(auth_token_file=missing), f"auth_token_file {missing} does not exist"),
        (lambda: ChannelSecurity.load(ca=missing), f"cloud_tls_ca {missing} does not exist"),
        (lambda: ChannelSecurity.load(cert=missing, key=pki.client.key), f"cloud_tls_cert {missing} does not exist"),
        (lambda: ChannelSecurity.load(token_file=missing), f"cloud_token_file {missing} does not exist"),
    ]
    for load, message in cases:
        with pytest.raises(ConfigurationError) as stopped:
            load()
        assert str(stopped.value) == message


@pytest.mark.parametrize("kind", UNREADABLE)
def test_unreadable_files_stop_start_up(pki: Pki, tmp_path: Path, kind: str) -> None:
    path = _unreadable(kind, tmp_path)
    with pytest.raises(ConfigurationError) as cert:
        ServerSecurity.load(path, pki.server.key)
    with pytest.raises(ConfigurationError) as token:
        ChannelSecurity.load(token_file=path)
    what = "is a directory, not a file" if kind == "directory" else "cannot be read: "
    assert str(cert.value).startswith(f"tls_cert {path} {what}")
    assert str(token.value).startswith(f"cloud_token_file {path} {what}")


def test_wrong_contents_stop_start_up(pki: Pki, tmp_path: Path) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_bytes(b"\x00\xffnot a certificate")
    cases: list[tuple[Callable[[], object], str]] = [
        (
            lambda: ServerSecurity.load(pki.server.cert, pki.client.key),
            f"tls_key {pki.client.key} does not match the certificate in tls_cert {pki.server.cert}",
        ),
        (
            lambda: ChannelSecurity.load(ca=pki.ca, cert=pki.client.cert, key=pki.other_client.key),
            f"cloud_tls_key {pki.other_client.key} does not match the certificate in cloud_tls_cert {pki.client.cert}",
        ),
        (
            lambda: ServerSecurity.load(pki.server.key, pki.server.key),
            f"tls_cert {pki.server.key} holds no PEM certificate ('-----BEGIN CERTIFICATE-----')",
        ),
        (
            lambda: ServerSecurity.load(pki.server.cert, pki.server.cert),
            f"tls_key {pki.server.cert} holds no PEM private key",
        ),
        (
            lambda: ServerSecurity.load(pki.server.cert, pki.server.key, not_pem),
            f"tls_client_ca {not_pem} holds no PEM certificate ('-----BEGIN CERTIFICATE-----')",
        ),
        (
            lambda: ServerSecurity.load(pki.encrypted.cert, pki.encrypted.key),
            f"tls_key {pki.encrypted.key} is encrypted; gRPC needs an unencrypted PEM key "
            "(keep it readable by this user only)",
        ),
        (lambda: ServerSecurity.load(pki.server.cert), "tls_cert and tls_key go together: give both, or neither"),
        (
            lambda: ServerSecurity.load(tls_client_ca=pki.ca),
            "tls_client_ca needs tls_cert and tls_key: client certificates need TLS",
        ),
        (
            lambda: ChannelSecurity.load(key=pki.client.key),
            "cloud_tls_cert and cloud_tls_key go together: give both, or neither",
        ),
        (
            lambda: ChannelSecurity.load(server_name="cloud.internal"),
            "cloud_tls_server_name needs TLS: give cloud_tls_ca",
        ),
    ]
    for load, message in cases:
        with pytest.raises(ConfigurationError) as stopped:
            load()
        assert str(stopped.value) == message


def _run_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "offload.tools.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **SUBPROCESS_ENV},
    )


def test_the_commands_stop_with_exit_code_2_and_one_line_naming_the_file(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing-cert.pem"
    socket_path = _unreadable("socket", tmp_path)
    runs = [
        (
            _run_command("edge", "--grpc-port", "0", "--tls-cert", str(missing), "--tls-key", str(pki.server.key)),
            f"offload edge: tls_cert {missing} does not exist",
        ),
        (
            _run_command(
                "edge",
                "--grpc-port",
                "0",
                "--cloud",
                "127.0.0.1:1",
                "--cloud-tls-ca",
                str(pki.ca),
                "--cloud-tls-cert",
                str(pki.client.cert),
                "--cloud-tls-key",
                str(pki.server.key),
            ),
            f"offload edge: cloud_tls_key {pki.server.key} does not match the certificate in "
            f"cloud_tls_cert {pki.client.cert}",
        ),
        (
            _run_command(
                "cloud",
                "--grpc-port",
                "0",
                "--tls-cert",
                str(pki.server.cert),
                "--tls-key",
                str(pki.server.key),
                "--tls-client-ca",
                str(socket_path),
            ),
            f"offload cloud: tls_client_ca {socket_path} cannot be read: ",
        ),
    ]
    for completed, message in runs:
        assert completed.returncode == 2, completed.stderr
        assert completed.stdout == ""
        assert completed.stderr.count("\n") == 1, completed.stderr
        assert completed.stderr.startswith(message), completed.stderr


def test_calibrate_takes_the_cloud_channel_flags(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing-token"
    completed = _run_command(
        "calibrate",
        "--model",
        "digits",
        "--data",
        str(DEMO_REPOSITORY / "digits" / "test.npz"),
        "--target-offload",
        "0.1",
        "--dry-run",
        "--cloud",
        "127.0.0.1:1",
        "--cloud-tls-ca",
        str(pki.ca),
        "--cloud-token-file",
        str(missing),
    )
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr == f"offload calibrate: cloud_token_file {missing} does not exist\n"


# --- end to end: app → edge agent (TLS, token) → cloud (mutual TLS, token), the real commands -------------------------


@dataclass
class SecureProcesses:
    cloud: ServerProcess
    edge: ServerProcess


@pytest.fixture(scope="module")
def secure_processes(pki: Pki) -> Iterator[SecureProcesses]:
    tls = ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key), "--auth-token-file", str(pki.tokens)]
    common = ["--grpc-port", "0", "--model-repository", str(DEMO_REPOSITORY)]
    with ServerProcess(["cloud", *common, *tls, "--tls-client-ca", str(pki.ca)], env=SUBPROCESS_ENV) as cloud:
        cloud_address = cloud.start()
        assert "mutual TLS (client certificates required), bearer token required" in cloud.output()
        edge_args = [
            "edge",
            *common,
            *tls,
            "--cloud",
            cloud_address,
            "--cloud-tls-ca",
            str(pki.ca),
            "--cloud-tls-cert",
            str(pki.client.cert),
            "--cloud-tls-key",
            str(pki.client.key),
            "--cloud-token-file",
            str(pki.token),
        ]
        with ServerProcess(edge_args, env=SUBPROCESS_ENV) as edge:
            edge.start()
            yield SecureProcesses(cloud, edge)


def _pixels(rows: int = 20) -> npt.NDArray[np.float32]:
    with np.load(DEMO_REPOSITORY / "digits" / "test.npz") as data:
        return np.ascontiguousarray(data["inputs"][:rows].astype(np.float32))


def _triton_infer(client: triton.InferenceServerClient, headers: dict[str, str] | None) -> triton.InferResult:
    pixels = _pixels()
    tensor = triton.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    return client.infer(
        "digits",
        [tensor],
        # Every row from the cloud, and an error rather than the edge's answer if the cloud refuses the agent.
        parameters={"offload_route": "cloud", "offload_require_cloud": True, "offload_details": True},
        headers=headers,
        client_timeout=TIMEOUT,
    )


def test_tritonclient_over_tls_reaches_the_cloud_over_mutual_tls(secure_processes: SecureProcesses, pki: Pki) -> None:
    authorization = {"authorization": f"Bearer {TOKEN}"}
    with triton.InferenceServerClient(
        url=secure_processes.edge.address, ssl=True, root_certificates=str(pki.ca)
    ) as client:
        result = _triton_infer(client, authorization)
        routes = result.as_numpy("offload_route")
        assert set(routes.tolist()) <= {b"cloud", b"cache"}
        assert b"cloud" in routes.tolist()
        assert not result.as_numpy("offload_degraded").any()
        assert result.as_numpy("scores").shape == (20, 10)
        assert client.is_server_ready(headers=authorization)

        with pytest.raises(InferenceServerException) as missing:
            _triton_infer(client, None)
        assert missing.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException) as wrong:
            _triton_infer(client, {"authorization": f"Bearer {WRONG_TOKEN}"})
        assert wrong.value.status() == "StatusCode.UNAUTHENTICATED"
        assert WRONG_TOKEN not in str(wrong.value)


def test_plaintext_to_the_tls_edge_agent_fails(secure_processes: SecureProcesses) -> None:
    with (
        triton.InferenceServerClient(url=secure_processes.edge.address) as client,
        pytest.raises(InferenceServerException) as refused,
    ):
        client.is_server_live(client_timeout=TIMEOUT)
    assert refused.value.status() == "StatusCode.UNAVAILABLE"
    assert TOKEN not in secure_processes.edge.output()
    assert TOKEN not in secure_processes.cloud.output()


def test_calibrate_reads_a_cloud_over_mutual_tls_with_a_token(
    secure_processes: SecureProcesses, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    common = [
        "calibrate",
        "--model",
        "digits",
        "--data",
        str(DEMO_REPOSITORY / "digits" / "test.npz"),
        "--target-offload",
        "0.1",
        "--dry-run",
        "--cloud",
        secure_processes.cloud.address,
        "--cloud-tls-ca",
        str(pki.ca),
        "--cloud-tls-cert",
        str(pki.client.cert),
        "--cloud-tls-key",
        str(pki.client.key),
    ]
    assert main([*common, "--cloud-token-file", str(pki.token)]) == 0
    assert "cloud-only accuracy" in capsys.readouterr().out
    assert main(common) == 2
    refused = capsys.readouterr().err
    assert refused.startswith("offload calibrate: the cloud at")
    assert "UNAUTHENTICATED" in refused


def test_every_setting_is_also_an_environment_variable(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    cloud_values = {
        "TLS_CERT": pki.server.cert,
        "TLS_KEY": pki.server.key,
        "TLS_CLIENT_CA": pki.ca,
        "AUTH_TOKEN_FILE": pki.tokens,
    }
    for name, path in cloud_values.items():
        monkeypatch.setenv(f"OFFLOAD_CLOUD_{name}", str(path))
    cloud = load_settings(CloudSettings)
    assert (cloud.tls_cert, cloud.tls_key, cloud.tls_client_ca, cloud.auth_token_file) == (
        pki.server.cert,
        pki.server.key,
        pki.ca,
        pki.tokens,
    )
    assert cloud.security().description == "mutual TLS (client certificates required), bearer token required"

    edge_values = {
        "CLOUD_TLS_CA": str(pki.ca),
        "CLOUD_TLS_CERT": str(pki.client.cert),
        "CLOUD_TLS_KEY": str(pki.client.key),
        "CLOUD_TLS_SERVER_NAME": "cloud.internal",
        "CLOUD_TOKEN_FILE": str(pki.token),
    }
    for name, value in edge_values.items():
        monkeypatch.setenv(f"OFFLOAD_EDGE_{name}", value)
    edge = load_settings(EdgeSettings)
    assert edge.cloud_tls_server_name == "cloud.internal"
    assert (edge.cloud_tls_ca, edge.cloud_tls_cert, edge.cloud_tls_key, edge.cloud_token_file) == (
        pki.ca,
        pki.client.cert,
        pki.client.key,
        pki.token,
    )
    channel = edge.cloud_security()
    assert channel.credentials is not None
    assert channel.options() == [("grpc.ssl_target_name_override", "cloud.internal")]
    assert channel.metadata() == (("authorization", f"Bearer {TOKEN}"),)
    # Flags (here: keyword settings) override the environment, as for every other setting.
    assert load_settings(EdgeSettings, cloud_tls_server_name="flag.internal").cloud_tls_server_name == "flag.internal"
