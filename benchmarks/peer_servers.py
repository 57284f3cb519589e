"""Peer servers for side-by-side benchmarks: Seldon MLServer and NVIDIA Triton serving the demo cloud model.

Each peer runs from a virtual environment of its own, made on first use under `.peers/` in the
repository (git-ignored) or taken from another folder (`venvs`, holding `mlserver/` and `triton/`):
- MLServer 1.7.1, the custom runtime benchmarks/peers/mlserver_model.py with adaptive batching
  (benchmarks/peers/mlserver/model-settings.json: up to 64 requests, waiting at most 1 ms, since
  MLServer batches only with a wait above 0). Parallel workers are off ("parallel_workers": 0):
  MLServer 1.7.1's workers die at start under uvloop ("There is no current event loop").
- Triton through nvidia-pytriton 0.7.0 (it bundles tritonserver), benchmarks/peers/triton_server.py,
  with the dynamic batcher (up to 64 rows, no extra queue delay: Triton's default, and what its
  guide starts from).
Both load the same cloud.pt2 (torch.export) on CUDA when there is one, else on the CPU, and run it as
`offload cloud` does by default: at most 2 batches at once (MLServer: 2 inference threads; Triton:
2 model instances), on CPU each with cores / 2 torch threads. torch is pinned in both
environments: an unpinned torch resolves to a multi-GB CUDA build.

A peer starts as a child process (its own process group, so the servers it starts stop with it) on
free loopback ports, and counts as started once the OIP ServerReady and ModelReady RPCs say true.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from offload.models import DEMO_REPOSITORY
from offload.oip import grpc_service_pb2 as pb
from offload.oip import grpc_service_pb2_grpc as pb_grpc

REPOSITORY = Path(__file__).resolve().parents[1]
PEERS = Path(__file__).resolve().parent / "peers"
DEFAULT_VENVS = REPOSITORY / ".peers"
CLOUD_MODEL = DEMO_REPOSITORY / "digits" / "cloud.pt2"
MODEL_NAME = "digits"
TORCH = "torch==2.13.0"
START_SECONDS = 300.0


@dataclass(frozen=True)
class PeerKind:
    name: str  # also the venv's folder name
    requirements: tuple[str, ...]


MLSERVER = PeerKind("mlserver", ("mlserver==1.7.1", TORCH))
TRITON = PeerKind("triton", ("nvidia-pytriton==0.7.0", TORCH))

_CHECK_VERSIONS = """
import importlib.metadata as metadata, sys
for requirement in sys.argv[1:]:
    name, version = requirement.split("==")
    try:
        if metadata.version(name).split("+")[0] != version:
            sys.exit(1)
    except metadata.PackageNotFoundError:
        sys.exit(1)
"""


def ensure_venv(kind: PeerKind, venvs: Path = DEFAULT_VENVS) -> Path:
    """The peer's Python, its environment made and its pinned packages installed where they are not yet."""
    venv = venvs / kind.name
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    if subprocess.run([str(python), "-c", _CHECK_VERSIONS, *kind.requirements], check=False).returncode != 0:
        print(f"installing {' '.join(kind.requirements)} into {venv} (first use: minutes) ...", file=sys.stderr)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *kind.requirements], check=True)
    if kind is TRITON:
        _install_sitecustomize(python)
    return python


def _install_sitecustomize(python: Path) -> None:
    site_packages = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    target = Path(site_packages) / "sitecustomize.py"
    source = (PEERS / "triton_sitecustomize.py").read_text()
    if not target.exists() or target.read_text() != source:
        target.write_text(source)


def free_port() -> int:
    """A port free now on loopback (for servers that cannot report a port 0 choice back)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PeerProcess:
    """A peer server process group: started, waited on until ready, stopped with SIGINT (then SIGKILL)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.name = name
        self._lines: collections.deque[str] = collections.deque(maxlen=200)
        self._process = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self._lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self._lines)

    def alive(self) -> bool:
        return self._process.poll() is None

    def stop(self, grace: float = 30.0) -> None:
        if not self.alive():
            return
        os.killpg(self._process.pid, signal.SIGINT)
        try:
            self._process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()

    async def wait_ready(self, address: str, model: str, timeout: float = START_SECONDS) -> None:
        """Until ServerReady and ModelReady say true; raises with the peer's output if it exits or times out.

        Connecting waits inside gRPC (wait_for_ready); a server that answers "not ready yet" is asked
        again after a short pause that doubles up to 0.5 s.
        """
        deadline = time.monotonic() + timeout
        pause = 0.05
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while True:
                if not self.alive():
                    raise RuntimeError(f"{self.name} exited before it was ready:\n{self.output()}")
                try:
                    server = await stub.ServerReady(pb.ServerReadyRequest(), timeout=1.0, wait_for_ready=True)
                    ready = server.ready
                    if ready:
                        ready = (await stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=1.0)).ready
                except grpc.aio.AioRpcError:
                    ready = False
                if ready:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name} was not ready within {timeout:.0f} s:\n{self.output()}")
                await asyncio.sleep(pause)
                pause = min(2 * pause, 0.5)


def _peer_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without our PYTHONPATH (the peer has its own packages), plus extra."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@contextmanager
def running(name: str, args: list[str], env: dict[str, str], address: str) -> Iterator[str]:
    """The peer started (in a scratch folder of its own) and ready; stopped on leaving."""
    with tempfile.TemporaryDirectory(prefix=f"offload-{name.lower()}-") as scratch:
        process = PeerProcess(name, args, env, Path(scratch))
        try:
            asyncio.run(process.wait_ready(address, MODEL_NAME))
            yield address
        finally:
            process.stop()


@contextmanager
def mlserver(venvs: Path = DEFAULT_VENVS) -> Iterator[str]:
    """MLServer serving the demo cloud model; yields its gRPC HOST:PORT."""
    python = ensure_venv(MLSERVER, venvs)
    grpc_port, http_port = free_port(), free_port()
    env = _peer_env(
        {
            "PYTHONPATH": str(PEERS),  # mlserver_model.py
            "MLSERVER_GRPC_PORT": str(grpc_port),
            "MLSERVER_HTTP_PORT": str(http_port),
        }
    )
    args = [str(python.parent / "mlserver"), "start", str(PEERS / "mlserver")]
    with running("MLServer", args, env, f"127.0.0.1:{grpc_port}") as address:
        yield address


@contextmanager
def triton(venvs: Path = DEFAULT_VENVS) -> Iterator[str]:
    """Triton (PyTriton) serving the demo cloud model; yields its gRPC HOST:PORT."""
    python = ensure_venv(TRITON, venvs)
    grpc_port = free_port()
    args = [str(python), str(PEERS / "triton_server.py"), "--model", str(CLOUD_MODEL), "--grpc-port", str(grpc_port)]
    with running("Triton", args, _peer_env({}), f"127.0.0.1:{grpc_port}") as address:
        yield address


@contextmanager
def minimal() -> Iterator[str]:
    """The minimal Python batching server (benchmarks/peers/minimal_batching_server.py) in this environment."""
    grpc_port = free_port()
    args = [sys.executable, str(PEERS / "minimal_batching_server.py"), "--grpc-port", str(grpc_port)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with running("minimal batching server", args, env, f"127.0.0.1:{grpc_port}") as address:
        yield address


def main() -> int:
    """Make both environments now (`python benchmarks/peer_servers.py [VENVS]`), e.g. ahead of a benchmark."""
    venvs = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_VENVS
    for kind in (MLSERVER, TRITON):
        print(f"{kind.name}: {ensure_venv(kind, venvs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
