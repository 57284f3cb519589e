"""Who may talk to whom: TLS credentials from PEM files, bearer tokens, and the check that guards a server.

Each side's security is built in one place from file paths (`ServerSecurity.load`,
`ChannelSecurity.load`), and every file is read and checked there, at start-up: a
missing or unreadable file, one that holds no certificate, an encrypted key or a
key that does not match its certificate stops the process with a ConfigurationError
naming the setting, the file and what is wrong. Nothing falls back to plaintext.

Bearer tokens: a server accepts any token in its token file (one a line, blank
lines and # comments ignored), a client sends the first token in its own. Both
files are re-read when they change (checked at most once a second, on use, so no
thread is needed). Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc

from offload.oip.errors import ConfigurationError, Unauthenticated, status_for

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
BEARER = "Bearer"
# How often, at most, a token file is checked for changes (its mtime, size and inode).
TOKEN_RELOAD_SECONDS = 1.0
# What a token may hold: visible ASCII, which a gRPC metadata value carries as is.
_TOKEN = re.compile(r"[\x21-\x7e]+")


# --- files -----------------------------------------------------------------------------------------------------------


def read_file(setting: str, path: Path) -> bytes:
    """The bytes of a file a setting names, or a ConfigurationError that names both and says what is wrong."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigurationError(f"{setting} {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigurationError(f"{setting} {path} is a directory, not a file") from None
    except OSError as exc:
        raise ConfigurationError(f"{setting} {path} cannot be read: {exc.strerror or exc}") from None


def _check_certificates(setting: str, path: Path) -> bytes:
    """The PEM bytes of a file that must hold at least one certificate (a chain, or CA certificates)."""
    data = read_file(setting, path)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=data.decode("ascii"))
    except (UnicodeDecodeError, ValueError, ssl.SSLError):
        raise ConfigurationError(f"{setting} {path} holds no PEM certificate ('-----BEGIN CERTIFICATE-----')") from None
    return data


class _EncryptedKey(Exception):
    """Raised instead of OpenSSL asking for a passphrase on the terminal."""


def _refuse_passphrase() -> bytes:
    raise _EncryptedKey


def _check_key_pair(cert_setting: str, cert: Path, key_setting: str, key: Path) -> tuple[bytes, bytes]:
    """The PEM bytes of a certificate chain and its private key, checked to belong together."""
    chain = _check_certificates(cert_setting, cert)
    key_bytes = read_file(key_setting, key)
    try:
        # The standard library checks that the key is the certificate's; gRPC would only fail at the first handshake.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=_refuse_passphrase)
    except _EncryptedKey:
        raise ConfigurationError(
            f"{key_setting} {key} is encrypted; gRPC needs an unencrypted PEM key (keep it readable by this user only)"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigurationError(
                f"{key_setting} {key} does not match the certificate in {cert_setting} {cert}"
            ) from None
        raise ConfigurationError(f"{key_setting} {key} holds no PEM private key") from None
    return chain, key_bytes


def _pair(cert_setting: str, cert: Path | None, key_setting: str, key: Path | None) -> tuple[Path, Path] | None:
    """A certificate and its key, both given, or neither."""
    if cert is not None and key is not None:
        return cert, key
    if cert is not None or key is not None:
        raise ConfigurationError(f"{cert_setting} and {key_setting} go together: give both, or neither")
    return None


# --- bearer tokens ---------------------------------------------------------------------------------------------------


def parse_tokens(setting: str, path: Path, data: bytes) -> tuple[bytes, ...]:
    """The tokens of a token file: one a line, blank lines and # comments ignored; at least one."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigurationError(f"{setting} {path} is not UTF-8 text") from None
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not _TOKEN.fullmatch(token):
            # The line is not quoted: it may be a token with a typo in it.
            raise ConfigurationError(f"{setting} {path}: line {number} is not a token (visible ASCII, no spaces)")
        tokens.append(token.encode("ascii"))
    if not tokens:
        raise ConfigurationError(f"{setting} {path} holds no token (one a line; blank lines and # comments ignored)")
    return tuple(tokens)


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What tells that a file changed (or was replaced), or None when it cannot be found."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


class TokenFile:
    """The tokens in a file, re-read when the file changes.

    A change is looked for at most every TOKEN_RELOAD_SECONDS, when the tokens are
    used. A file that is gone, unreadable or empty after a change keeps the tokens
    read before (with a WARNING once), so a token rotation written non-atomically
    cannot lock every caller out halfway through.
    """

    def __init__(self, setting: str, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.setting = setting
        self.path = path
        self._clock = clock
        self._signature = _signature(path)
        self._tokens = parse_tokens(setting, path, read_file(setting, path))
        self._checked_at = clock()

    def tokens(self) -> tuple[bytes, ...]:
        now = self._clock()
        if now - self._checked_at >= TOKEN_RELOAD_SECONDS:
            self._checked_at = now
            self._reload_if_changed()
        return self._tokens

    def _reload_if_changed(self) -> None:
        signature = _signature(self.path)
        if signature == self._signature:
            return
        self._signature = signature
        try:
            if signature is None:
                raise ConfigurationError(f"{self.setting} {self.path} cannot be found")
            self._tokens = parse_tokens(self.setting, self.path, read_file(self.setting, self.path))
        except ConfigurationError as exc:
            log.warning("%s; still using the %d token(s) read before", exc, len(self._tokens))
            return
        log.info("%s %s reloaded: %d token(s)", self.setting, self.path, len(self._tokens))

    def accepts(self, presented: bytes) -> bool:
        """Whether `presented` is one of the tokens: every token is compared, each in constant time."""
        accepted = False
        for token in self.tokens():
            accepted |= hmac.compare_digest(token, presented)
        return accepted

    def header(self) -> tuple[str, str]:
        """The metadata a client sends: its file's first token."""
        return AUTHORIZATION, f"{BEARER} {self.tokens()[0].decode('ascii')}"


def check_bearer(tokens: TokenFile, metadata: Sequence[tuple[str, str | bytes]] | None) -> None:
    """Raise Unauthenticated unless the call's metadata carries an accepted bearer token.

    The messages say what to send and never repeat what was sent.
    """
    values = [value for key, value in metadata or () if key == AUTHORIZATION]
    if not values:
        raise Unauthenticated(f"this server needs a bearer token: send metadata '{AUTHORIZATION}: {BEARER} <token>'")
    value = values[0] if isinstance(values[0], str) else values[0].decode("ascii", "replace")
    scheme, _, credential = value.strip().partition(" ")
    if scheme.lower() != BEARER.lower() or not credential.strip():
        raise Unauthenticated(f"the {AUTHORIZATION} metadata is not '{BEARER} <token>'")
    if not tokens.accepts(credential.strip().encode("utf-8", "replace")):
        raise Unauthenticated("the bearer token was not accepted")


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuse the methods of one service (inference) without an accepted token; others (health, reflection) pass."""

    def __init__(self, tokens: TokenFile, service: str) -> None:
        self._tokens = tokens
        self._prefix = f"/{service}/"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefix):
            return handler
        try:
            check_bearer(self._tokens, handler_call_details.invocation_metadata)
        except Unauthenticated as exc:
            log.debug("refused %s: %s", handler_call_details.method, exc)
            return _refusing(handler, exc)
        return handler


def _refusing(handler: grpc.RpcMethodHandler[Any, Any], exc: Exception) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind as `handler` that answers with exc's status and reads nothing."""
    code, message = status_for(exc)

    async def refuse(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, message)

    # No deserializer: a refused request is never decoded.
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


# --- the two sides ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSecurity:
    """A server's TLS credentials (None: plaintext) and the tokens it accepts (None: any caller)."""

    credentials: grpc.ServerCredentials | None = None
    tokens: TokenFile | None = None
    description: str = "plaintext, no token"

    @classmethod
    def load(
        cls,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_client_ca: Path | None = None,
        auth_token_file: Path | None = None,
    ) -> ServerSecurity:
        credentials = None
        parts = ["plaintext"]
        pair = _pair("tls_cert", tls_cert, "tls_key", tls_key)
        if pair is not None:
            chain, key = _check_key_pair("tls_cert", pair[0], "tls_key", pair[1])
            client_ca = None if tls_client_ca is None else _check_certificates("tls_client_ca", tls_client_ca)
            credentials = grpc.ssl_server_credentials(
                [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
            )
            parts = ["TLS" if client_ca is None else "mutual TLS (client certificates required)"]
        elif tls_client_ca is not None:
            raise ConfigurationError("tls_client_ca needs tls_cert and tls_key: client certificates need TLS")
        tokens = None if auth_token_file is None else TokenFile("auth_token_file", auth_token_file)
        if tokens is not None and credentials is None:
            log.warning("bearer tokens without TLS travel in plaintext: anyone on the path can read and replay them")
        parts.append("bearer token required" if tokens is not None else "no token")
        return cls(credentials, tokens, ", ".join(parts))

    def interceptors(self, service: str) -> list[grpc.aio.ServerInterceptor]:
        """What guards `service` (the inference service) on a server with these settings."""
        return [] if self.tokens is None else [BearerTokenInterceptor(self.tokens, service)]


@dataclass(frozen=True)
class ChannelSecurity:
    """A client's TLS credentials (None: plaintext), the name to check the server's certificate against
    (None: the target's host), and the token file it sends from (None: no token)."""

    credentials: grpc.ChannelCredentials | None = None
    server_name: str | None = None
    token: TokenFile | None = None

    @classmethod
    def load(
        cls,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        server_name: str | None = None,
        token_file: Path | None = None,
        prefix: str = "cloud_",
    ) -> ChannelSecurity:
        """From the settings `<prefix>tls_ca`, `<prefix>tls_cert`, ... (named so in messages).

        TLS is on when a CA or a client certificate is given; without a CA the system's roots verify the server.
        """
        credentials = None
        pair = _pair(f"{prefix}tls_cert", cert, f"{prefix}tls_key", key)
        if ca is not None or pair is not None:
            root = None if ca is None else _check_certificates(f"{prefix}tls_ca", ca)
            chain, private_key = (None, None)
            if pair is not None:
                chain, private_key = _check_key_pair(f"{prefix}tls_cert", pair[0], f"{prefix}tls_key", pair[1])
            credentials = grpc.ssl_channel_credentials(root, private_key, chain)
        elif server_name is not None:
            raise ConfigurationError(f"{prefix}tls_server_name needs TLS: give {prefix}tls_ca")
        token = None if token_file is None else TokenFile(f"{prefix}token_file", token_file)
        if token is not None and credentials is None:
            log.warning("the %stoken_file token goes in plaintext; give %stls_ca to send it over TLS", prefix, prefix)
        return cls(credentials, server_name, token)

    def for_name(self, name: str) -> ChannelSecurity:
        """The same, for a channel dialled at an address that a DNS lookup of `name` found: the server's
        certificate is checked against `name` (unless a server name was given), not against the address."""
        if self.credentials is None or self.server_name is not None:
            return self
        return replace(self, server_name=name)

    def options(self) -> list[tuple[str, str]]:
        """Channel options: the name the server's certificate is checked against, when overridden."""
        return [] if self.server_name is None else [("grpc.ssl_target_name_override", self.server_name)]

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata for every call: the bearer token, read from the file as it is now."""
        return () if self.token is None else (self.token.header(),)
