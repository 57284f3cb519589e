"""Fetching a published model repository over HTTP (httpx): its manifest, with ETags, and its files, verified.

Any server or object store that serves files will do. The manifest is asked for with `If-None-Match`, so an
unchanged repository costs one 304. Files stream to disk, capped by the size the manifest gives them: a
`Content-Length` that differs is refused before a byte is read, a body that runs past it is cut off while
reading, and the SHA-256 is checked at the end. Nothing is ever allocated from a size the server declares.
Transport failures and 5xx/408/429 answers are retried (tenacity: bounded attempts, exponential backoff with
jitter); anything else fails at once with a message that says what to do.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_random_exponential

from offload.oip.errors import ConfigurationError
from offload.oip.manifest import MANIFEST_FILE, Manifest, ManifestFile

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]
T = TypeVar("T")
# A manifest lists files, not their contents: a few KiB per model. More than this is not a manifest.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_CHUNK = 256 * 1024
_RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class DownloadError(Exception):
    """A download that failed; the message says what failed and what to do."""


class InvalidManifest(DownloadError):
    """The server answered with something that is not a valid manifest (`etag`: what it sent it under)."""

    def __init__(self, message: str, etag: str | None) -> None:
        super().__init__(message)
        self.etag = etag


@dataclass(frozen=True, slots=True)
class DownloadPolicy:
    """How hard to try one HTTP request: attempts (the first included) and the backoff between them."""

    attempts: int = 4
    initial_backoff_seconds: float = 1.0
    max_backoff_seconds: float = 30.0
    # Connecting, and the longest wait for the next bytes of an answer (not the whole transfer).
    timeout_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class PublishedManifest:
    manifest: Manifest
    raw: bytes  # as served, to keep beside the files
    etag: str | None


class RepositoryClient:
    """The published repository at `url`: `URL/manifest.json` and `URL/PATH` for each file it lists."""

    def __init__(
        self,
        url: str,
        policy: DownloadPolicy | None = None,
        sleep: Sleep = asyncio.sleep,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url
        self._base = httpx.URL(url if url.endswith("/") else url + "/")
        self.policy = policy or DownloadPolicy()
        self._sleep = sleep
        # identity: the manifest's sizes and checksums are of the files, not of a compressed transfer.
        self._client = httpx.AsyncClient(
            timeout=self.policy.timeout_seconds,
            follow_redirects=True,
            headers={"accept-encoding": "identity"},
            transport=transport,
        )

    @property
    def manifest_url(self) -> str:
        return str(self._base.join(MANIFEST_FILE))

    def file_url(self, path: str) -> str:
        return str(self._base.join(quote(path)))

    async def close(self) -> None:
        await self._client.aclose()

    async def manifest(self, etag: str | None) -> PublishedManifest | None:
        """The published manifest, or None when the server answers 304 to `etag` (unchanged)."""
        url = self.manifest_url
        headers = {"if-none-match": etag} if etag else {}

        async def get() -> PublishedManifest | None:
            async with self._client.stream("GET", url, headers=headers) as response:
                if response.status_code == httpx.codes.NOT_MODIFIED:
                    return None
                _check_status(
                    response,
                    "the manifest",
                    "run `offload manifest DIR` on the repository folder and publish DIR/manifest.json with it",
                )
                declared = _declared_length(response)
                if declared is not None and declared > MAX_MANIFEST_BYTES:
                    raise DownloadError(
                        f"{url}: the server declares {declared} bytes, more than a manifest may have "
                        f"({MAX_MANIFEST_BYTES}); check that the URL names the repository's folder"
                    )
                body = bytearray()
                async for chunk in response.aiter_bytes(_CHUNK):
                    body += chunk
                    if len(body) > MAX_MANIFEST_BYTES:
                        raise DownloadError(
                            f"{url}: longer than a manifest may be ({MAX_MANIFEST_BYTES} bytes); check that the URL "
                            "names the repository's folder"
                        )
                raw = bytes(body)
                try:
                    manifest = Manifest.parse(raw, url)
                except ConfigurationError as exc:
                    raise InvalidManifest(
                        f"{exc}; publish one written by `offload manifest DIR`", response.headers.get("etag")
                    ) from exc
                return PublishedManifest(manifest, raw, response.headers.get("etag"))

        return await self._retried(get, url)

    async def download(self, file: ManifestFile, destination: Path) -> None:
        """Fetch `file` to `destination` (its folder must exist) and check its size and SHA-256 against the
        manifest; DownloadError (and no file left behind) otherwise."""
        url = self.file_url(file.path)
        try:
            await self._retried(lambda: self._fetch(file, url, destination), url)
        except OSError as exc:
            raise DownloadError(
                f"{destination}: cannot be written ({exc.strerror or exc}); check the free space and the permissions "
                "of model_cache_dir"
            ) from exc

    async def _fetch(self, file: ManifestFile, url: str, destination: Path) -> None:
        async with self._client.stream("GET", url) as response:
            _check_status(
                response, f"{file.path} (listed in the manifest)", "publish every file the manifest lists before it"
            )
            declared = _declared_length(response)
            if declared is not None and declared != file.size:
                raise DownloadError(
                    f"{url}: the server declares {declared} bytes, the manifest {file.size}; the file on the server "
                    "is not the one the manifest describes: publish the files first and the manifest last, or "
                    "write the manifest again with `offload manifest DIR`"
                )
            # Disk writes run in a worker thread: a device's flash can be slow, and the loop serves calls.
            sink = await asyncio.to_thread(_FileSink, destination)
            try:
                async for chunk in response.aiter_bytes(_CHUNK):
                    if sink.size + len(chunk) > file.size:
                        raise DownloadError(
                            f"{url}: longer than the {file.size} bytes the manifest gives it; write the manifest "
                            "again with `offload manifest DIR`"
                        )
                    await asyncio.to_thread(sink.write, chunk)
                await asyncio.to_thread(sink.finish)
            except BaseException:
                await asyncio.to_thread(sink.discard)
                raise
        if sink.size != file.size:
            await asyncio.to_thread(sink.discard)
            raise DownloadError(
                f"{url}: {sink.size} of the manifest's {file.size} bytes arrived (cut short); the next look at the "
                "repository tries again"
            )
        if sink.sha256 != file.sha256:
            await asyncio.to_thread(sink.discard)
            raise DownloadError(
                f"{url}: checksum mismatch (SHA-256 {sink.sha256}, the manifest says {file.sha256}); the file on "
                "the server is not the one the manifest describes: publish the files first and the manifest last, "
                "or write the manifest again with `offload manifest DIR`"
            )

    async def _retried(self, call: Callable[[], Awaitable[T]], url: str) -> T:
        policy = self.policy
        retrying = AsyncRetrying(
            stop=stop_after_attempt(policy.attempts),
            wait=wait_random_exponential(multiplier=policy.initial_backoff_seconds, max=policy.max_backoff_seconds),
            retry=retry_if_exception(_transient),
            sleep=self._sleep,
            before_sleep=_log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await call()
        except httpx.HTTPError as exc:
            raise DownloadError(f"{url}: {_describe(exc)} (after {policy.attempts} attempts)") from exc
        except _RetriedStatus as exc:
            raise DownloadError(f"{exc} (after {policy.attempts} attempts)") from exc
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover


class _FileSink:
    """A file being downloaded: written, hashed and counted as it comes (blocking: call it from a thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("wb")
        self._digest = hashlib.sha256()
        self.size = 0

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._digest.update(chunk)
        self.size += len(chunk)

    def finish(self) -> None:
        self._file.flush()
        # On disk before it is trusted: a device may lose power right after a rollout.
        os.fsync(self._file.fileno())
        self._file.close()

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class _RetriedStatus(Exception):
    """An HTTP answer worth asking again for (5xx, 408, 429)."""


def _check_status(response: httpx.Response, what: str, if_missing: str) -> None:
    status = response.status_code
    if status == httpx.codes.OK:
        return
    url = response.request.url
    if status in _RETRIED_STATUSES:
        raise _RetriedStatus(f"{url}: HTTP {status} {response.reason_phrase}")
    if status == httpx.codes.NOT_FOUND:
        raise DownloadError(f"{url}: HTTP 404, {what} is not there; {if_missing}")
    raise DownloadError(
        f"{url}: HTTP {status} {response.reason_phrase} for {what}; check the URL and that the server lets this "
        "device read it"
    )


def _declared_length(response: httpx.Response) -> int | None:
    """The body's length as the server declares it, if it does (None for a compressed or chunked body)."""
    text = response.headers.get("content-length")
    if text is None or response.headers.get("content-encoding", "identity") != "identity":
        return None
    if not text.isascii() or not text.isdigit():
        raise DownloadError(f"{response.request.url}: Content-Length {text!r} is not a number")
    return int(text)


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, httpx.TransportError | _RetriedStatus)


def _describe(exc: httpx.HTTPError) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _log_retry(state: RetryCallState) -> None:
    outcome = state.outcome
    error = outcome.exception() if outcome is not None else None
    wait = state.next_action.sleep if state.next_action is not None else 0.0
    reason = _describe(error) if isinstance(error, httpx.HTTPError) else str(error)
    log.info("model repository: %s; trying again in %.1fs (attempt %d)", reason, wait, state.attempt_number + 1)
