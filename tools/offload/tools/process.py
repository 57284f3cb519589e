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
from pathlib import Path

_LISTENING = re.compile(r"listening on (\S+):(\d+)")


class ServerProcess:
    """One `python -m offload.tools.cli <kind> ...` child process."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.args = [sys.executable, "-m", "offload.tools.cli", *args]
        self._env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self._lines: collections.deque[str] = collections.deque(maxlen=200)
        self._printed = threading.Condition()  # notified on every line
        self._ended = False
        self._ready = threading.Event()
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self.address = ""

    def start(self, timeout: float = 120.0) -> str:
        """Start the process and return HOST:PORT once it listens; raise with its output if it does not."""
        self._process = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self._env
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout) or not self.address:
            self.kill()
            raise RuntimeError(f"{' '.join(self.args[3:])} did not start within {timeout}s:\n{self.output()}")
        return self.address

    def _read(self) -> None:
        assert self._process is not None
        assert self._process.stdout is not None
        for line in self._process.stdout:
            with self._printed:
                self._lines.append(line.rstrip("\n"))
                self._printed.notify_all()
            match = _LISTENING.search(line)
            if match and not self.address:
                host, port = match.groups()
                self.address = f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
                self._ready.set()
        with self._printed:
            self._ended = True
            self._printed.notify_all()
        self._ready.set()  # the process ended: stop waiting

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def wait_for_line(self, text: str, timeout: float = 30.0) -> str:
        """The first of the last lines printed that contains `text`, once there is one; raises
        RuntimeError if the process ends or `timeout` passes first."""

        def found() -> str | None:
            return next((line for line in self._lines if text in line), None)

        with self._printed:
            if not self._printed.wait_for(lambda: found() is not None or self._ended, timeout):
                raise RuntimeError(f"no line with {text!r} within {timeout}s:\n{self.output()}")
            line = found()
        if line is None:
            raise RuntimeError(f"the process ended without a line with {text!r}:\n{self.output()}")
        return line

    def memory(self) -> tuple[int, int]:
        """Resident bytes now, and the most resident since the start or `reset_peak_memory` (Linux: VmRSS
        and VmHWM of /proc/PID/status)."""
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.pid}/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024

    def reset_peak_memory(self) -> None:
        """Start the peak `memory` reports afresh from the present resident size (Linux 4.0 on)."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def output(self) -> str:
        """The last lines the process printed (stdout and stderr)."""
        with self._printed:  # not while the reader appends
            return "\n".join(self._lines)

    def wait_for_output(self, text: str, timeout: float = 30.0) -> str:
        """The first line (of the last ones kept) that contains `text`, once the process has printed it;
        raise with the output if it does not within the timeout or ends first."""
        with self._printed:
            found = self._printed.wait_for(lambda: self._line_with(text) is not None or self._ended, timeout)
            line = self._line_with(text)
        if line is None:
            state = "ended" if found else f"did not print it within {timeout}s"
            raise RuntimeError(f"{' '.join(self.args[3:])} never printed {text!r} ({state}):\n{self.output()}")
        return line

    def _line_with(self, text: str) -> str | None:
        return next((line for line in self._lines if text in line), None)

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
            code = self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        if self._reader is not None:
            # The reader may still be taking in the last lines: once wait returns, output() has them.
            self._reader.join(timeout)
        return code

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()
