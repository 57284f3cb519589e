"""A real HTTP server on loopback that publishes model repositories, with ETags and faults on demand.

stdlib http.server in a thread, serving a folder: GET answers 200 with Content-Length and an ETag (the
quoted SHA-256 of the file), or 304 when If-None-Match names the current one. Faults: paths in `cut_short`
get their full Content-Length but half the bytes before the connection closes (a dropped transfer); paths in
`unsized` get no Content-Length (the body ends when the connection closes). Every answer is recorded, so a
test can say what was fetched.

Also the model versions the tests publish: the demo's digits model with its version bumped and, as a
different model, its output classes reversed (so its answers change).
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import onnx
from onnx import numpy_helper

from offload.models import DEMO_REPOSITORY
from offload.oip.manifest import Manifest, write_manifest


@dataclass(frozen=True)
class Served:
    path: str
    status: int
    if_none_match: str | None


class RepositoryServer:
    """Serves `root` on 127.0.0.1 (a free port) while started."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.cut_short: set[str] = set()
        self.unsized: set[str] = set()
        self._served: list[Served] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/repository/"

    def served(self) -> list[Served]:
        with self._lock:
            return list(self._served)

    def fetched(self, path: str) -> int:
        """How many times `path` (relative to the repository) was answered in full (200)."""
        return sum(1 for item in self.served() if item.path == path and item.status == 200)

    def publish(self, repository: Path, version: str | None = None) -> Manifest:
        """Publish a repository folder as a publisher would: `offload manifest` on it, its model folders, then
        the manifest (replacing the previous one in one step)."""
        written, manifest = write_manifest(repository, version)
        for folder in sorted(path for path in repository.iterdir() if path.is_dir()):
            shutil.copytree(folder, self.root / folder.name, dirs_exist_ok=True)
        partial = self.root / "manifest.json.partial"
        shutil.copyfile(written, partial)
        partial.replace(self.root / "manifest.json")
        return manifest

    def start(self) -> RepositoryServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()

    def _record(self, served: Served) -> None:
        with self._lock:
            self._served.append(served)


def _handler(server: RepositoryServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            path = unquote(urlsplit(self.path).path).removeprefix("/repository/")
            if_none_match = self.headers.get("If-None-Match")
            file = (server.root / path).resolve()
            if not file.is_relative_to(server.root.resolve()) or not file.is_file():
                self._answer(path, 404, if_none_match, b"not found\n")
                return
            body = file.read_bytes()
            etag = f'"{hashlib.sha256(body).hexdigest()}"'
            if if_none_match == etag:
                server._record(Served(path, 304, if_none_match))
                self.send_response(304)
                self.send_header("ETag", etag)
                self.end_headers()
                return
            server._record(Served(path, 200, if_none_match))
            self.send_response(200)
            self.send_header("ETag", etag)
            if path in server.unsized:
                self.send_header("Connection", "close")
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if path in server.cut_short:
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return
            self.wfile.write(body)

        def _answer(self, path: str, status: int, if_none_match: str | None, body: bytes) -> None:
            server._record(Served(path, status, if_none_match))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: tests read `served()` instead."""

    return Handler


@contextmanager
def serving(root: Path) -> Iterator[RepositoryServer]:
    server = RepositoryServer(root).start()
    try:
        yield server
    finally:
        server.stop()


def digits_version(root: Path, version: str, reversed_classes: bool = False) -> Path:
    """A repository at `root` with the demo's digits model (model.toml and edge.onnx) as version `version`;
    with `reversed_classes`, an edge model whose output classes are reversed, so that its answers differ."""
    folder = root / "digits"
    folder.mkdir(parents=True)
    config = (DEMO_REPOSITORY / "digits" / "model.toml").read_text()
    assert 'version = "1"\n' in config
    (folder / "model.toml").write_text(config.replace('version = "1"\n', f'version = "{version}"\n'))
    model = onnx.load(str(DEMO_REPOSITORY / "digits" / "edge.onnx"))
    if reversed_classes:
        for initializer in model.graph.initializer:
            if initializer.name in ("output.weight", "output.bias"):
                flipped = np.ascontiguousarray(numpy_helper.to_array(initializer)[::-1])
                initializer.CopyFrom(numpy_helper.from_array(flipped, initializer.name))
    onnx.save(model, str(folder / "edge.onnx"))
    return root
