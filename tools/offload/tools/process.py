"""Start an Offload server as a child process and learn its address from its first line.

Servers print `offload-<kind> listening on HOST:PORT` once they serve, so a
caller binds port 0 and waits on that line: no sleeps, no port races.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

_LISTENING = re.compile(r"listening on (\S+):(\d+)")


class ServerProcess:
    """One `python -m offload.tools.cli <kind> ...` child process."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.args = [sys.executable, "-m", "offload.tools.cli", *args]
        self._env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self._lines: collections.deque[str] = collections.deque(maxlen=200)
        self._ready = threading.Event()
        self._process: subprocess.Popen[str] | None = None
        self.address = ""

    def start(self, timeout: float = 120.0) -> str:
        """Start the process and return HOST:PORT once it listens; raise with its output if it does not."""
        self._process = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self._env
        )
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(timeout) or not self.address:
            self.kill()
            raise RuntimeError(f"{' '.join(self.args[3:])} did not start within {timeout}s:\n{self.output()}")
        return self.address

    def _read(self) -> None:
        assert self._process is not None
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self._lines.append(line.rstrip("\n"))
            match = _LISTENING.search(line)
            if match and not self.address:
                host, port = match.groups()
                self.address = f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
                self._ready.set()
        self._ready.set()  # the process ended: stop waiting

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def memory_kib(self) -> dict[str, int]:
        """The process's memory from /proc (Linux): VmRSS (resident now) and VmHWM (the peak), in KiB."""
        fields: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    fields[name] = int(value.split()[0])
        return fields

    def reset_peak_memory(self) -> None:
        """Start VmHWM over from the resident memory now (Linux: /proc/PID/clear_refs)."""
        with open(f"/proc/{self.pid}/clear_refs", "w") as clear_refs:
            clear_refs.write("5")

    def output(self) -> str:
        """The last lines the process printed (stdout and stderr)."""
        return "\n".join(self._lines)

    def signal(self, signum: signal.Signals) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signum)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful shutdown) and wait; returns the exit code."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit on its own (say after a signal the caller sent); returns the
        exit code, and kills it if it has not exited within the timeout.

        After a shutdown signal, wait rather than terminate: a second signal that lands while the
        interpreter tears down (its handlers already gone) kills it instead of letting it exit 0.
        """
        if self._process is None:
            return 0
        try:
            return self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()
