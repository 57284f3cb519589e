"""Recording the cloud's answers on the device, for distillation (opt-in: `record_dir`; off by default).

These are the users' own inputs, so nothing is recorded unless the operator names a folder. With one, every
row the cloud newly answers (offloaded rows, audited rows; not cached ones) is kept with the cloud's outputs,
for `offload distill` to train the next edge model on. The router tells `Recorder.on_cloud_rows` (an
offload.router.fetch.CloudRowsHook) on the event loop; that only puts the rows on a bounded queue, or drops
and counts them when the queue is full, so recording never blocks or slows a request. One thread writes.

On disk: rotating `.npz` files (uncompressed, so their size is known before they are written), oldest
deleted first once the folder's files pass `max_bytes` together; each file at most `file_max_bytes`
(max_bytes / 8, at most 16 MiB). A file holds rows of one model, edge version and cloud version:

    rec-00000042-digits.npz        # sequence number (oldest first), model name
      input.pixels                 # every input, by name, rows as sent to the cloud
      output.scores                # every output, by name, as the cloud answered
      meta.format                  # 1
      meta.model, meta.model_version, meta.cloud_model, meta.cloud_version   # text

Files appear whole (written under a temporary name, then renamed). Rows wait in memory until their file is
full, for at most FLUSH_SECONDS, or until the recorder is flushed or closed (the agent closes it at shutdown):
rows still waiting when the process is killed are lost. One agent per folder.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import re
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from offload.oip.errors import ConfigurationError, one_line
from offload.router.models import RoutedModel

log = logging.getLogger(__name__)

Arrays = dict[str, npt.NDArray[Any]]

FORMAT = 1
INPUT, OUTPUT, META = "input.", "output.", "meta."
# Each file is at most this, and at most 1/FILES_PER_BOUND of the folder's bound: deleting the oldest file
# frees a small share of the recording.
MAX_FILE_BYTES = 16 * 1024 * 1024
FILES_PER_BOUND = 8
# Room kept per array in a file beyond its data: its zip entries and its .npy header (about 260 bytes).
ARRAY_OVERHEAD_BYTES = 512
# Rows wait at most this long in memory before they are written, even to a file that is not full.
FLUSH_SECONDS = 60.0
# Cloud answers waiting for the writer thread; past that they are dropped and counted.
QUEUE_BATCHES = 256

_NAME = re.compile(r"^rec-(\d+)-[A-Za-z0-9_.\-]+\.npz$")
_TEMPORARY_PREFIX = ".rec-"


@dataclass(frozen=True, slots=True)
class RecordingStats:
    """What the recorder did since it started, at one moment."""

    folder: str
    rows: int  # rows the cloud answered that were handed to the writer
    dropped: int  # rows not recorded: the queue was full, a row does not fit a file or an .npz, a write failed
    rows_written: int  # rows in the files written (some may since have been deleted past the bound)
    bytes_written: int
    files_written: int
    files_deleted: int  # oldest files deleted to stay within the bound
    bytes_on_disk: int  # the recording files in the folder now


@dataclass(frozen=True, slots=True)
class CloudRows:
    """One cloud answer to record."""

    model: str
    model_version: str
    cloud_model: str
    cloud_version: str
    inputs: Arrays
    outputs: Arrays

    @property
    def rows(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def arrays(self) -> Arrays:
        """The data as a file keeps it, without the metadata."""
        return {
            **{INPUT + name: array for name, array in self.inputs.items()},
            **{OUTPUT + name: array for name, array in self.outputs.items()},
        }

    def metadata(self) -> Arrays:
        return {
            META + "format": np.array(FORMAT),
            META + "model": np.array(self.model),
            META + "model_version": np.array(self.model_version),
            META + "cloud_model": np.array(self.cloud_model),
            META + "cloud_version": np.array(self.cloud_version),
        }

    def group(self) -> tuple[Any, ...]:
        """Rows with the same group can share a file: one model, versions, and each array's row layout."""
        layout = tuple((name, array.dtype.str, array.shape[1:]) for name, array in self.arrays().items())
        return (self.model, self.model_version, self.cloud_model, self.cloud_version, layout)

    def part(self, start: int, stop: int) -> CloudRows:
        def rows(arrays: Arrays) -> Arrays:
            return {name: array[start:stop] for name, array in arrays.items()}

        return CloudRows(
            self.model, self.model_version, self.cloud_model, self.cloud_version, rows(self.inputs), rows(self.outputs)
        )


@dataclass
class _Pending:
    """Rows of one group waiting for their file."""

    first_at: float
    parts: list[CloudRows] = field(default_factory=list)
    rows: int = 0


class RecordFolder:
    """The files of a recording folder: rows go in with `add`, files come out within the bounds.

    Used from one thread at a time (the Recorder's writer).
    """

    def __init__(
        self,
        folder: Path,
        max_bytes: int,
        file_max_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.file_max_bytes = min(max_bytes, file_max_bytes or min(MAX_FILE_BYTES, max_bytes // FILES_PER_BOUND))
        self._clock = clock
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # A temporary file is a write that a killed process left unfinished.
            for stale in folder.glob(f"{_TEMPORARY_PREFIX}*"):
                stale.unlink()
            self._files = [(path, path.stat().st_size) for path in record_files(folder)]
        except OSError as exc:
            raise ConfigurationError(f"record_dir {folder}: cannot record there: {one_line(exc)}") from exc
        last = _NAME.match(self._files[-1][0].name) if self._files else None
        self._next = int(last.group(1)) + 1 if last else 1
        self._pending: dict[tuple[Any, ...], _Pending] = {}
        self.rows_written = 0
        self.bytes_written = 0
        self.files_written = 0
        self.files_deleted = 0
        self.rows_lost = 0
        self._warned: set[str] = set()
        self._delete_past_bound()

    @property
    def bytes_on_disk(self) -> int:
        return sum(size for _, size in self._files)

    def add(self, rows: CloudRows) -> None:
        """Take the rows; write every file they fill. Rows too large for any file are counted lost."""
        key = rows.group()
        data, metadata = rows.arrays(), rows.metadata()
        room = self.file_max_bytes - sum(array.nbytes for array in metadata.values())
        room -= ARRAY_OVERHEAD_BYTES * (len(data) + len(metadata))
        row_bytes = sum(array[:1].nbytes for array in data.values())
        if rows.rows == 0 or row_bytes == 0:
            return  # nothing to keep
        if row_bytes > room:
            self._lose(rows.rows, f"a row of {rows.model!r} ({row_bytes} bytes) does not fit a file", rows.model)
            return
        per_file = room // row_bytes
        start = 0
        while start < rows.rows:
            pending = self._pending.setdefault(key, _Pending(self._clock()))
            take = min(per_file - pending.rows, rows.rows - start)
            pending.parts.append(rows.part(start, start + take))
            pending.rows += take
            start += take
            if pending.rows == per_file:
                self._write(key)

    def flush(self, max_age: float | None = None) -> None:
        """Write the rows waiting: all of them, or those that have waited max_age seconds or more."""
        now = self._clock()
        for key in [key for key, p in self._pending.items() if max_age is None or now - p.first_at >= max_age]:
            self._write(key)

    def next_flush_in(self, max_age: float) -> float | None:
        """Seconds until flush(max_age) has something to write (None: nothing waits)."""
        if not self._pending:
            return None
        oldest = min(pending.first_at for pending in self._pending.values())
        return max(0.0, oldest + max_age - self._clock())

    def _write(self, key: tuple[Any, ...]) -> None:
        pending = self._pending.pop(key)
        first = pending.parts[0]
        names = first.arrays()
        arrays = {name: np.concatenate([part.arrays()[name] for part in pending.parts]) for name in names}
        path = self.folder / f"rec-{self._next:08d}-{first.model}.npz"
        handle, temporary = tempfile.mkstemp(prefix=_TEMPORARY_PREFIX, suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(handle, "wb") as stream:
                np.savez(stream, allow_pickle=False, **arrays, **first.metadata())
            os.replace(temporary, path)
            size = path.stat().st_size
        except OSError as exc:
            Path(temporary).unlink(missing_ok=True)
            self._lose(pending.rows, f"writing {path} failed: {one_line(exc)}", "write")
            return
        self._next += 1
        self._files.append((path, size))
        self.rows_written += pending.rows
        self.bytes_written += size
        self.files_written += 1
        self._delete_past_bound()

    def _delete_past_bound(self) -> None:
        while self._files and self.bytes_on_disk > self.max_bytes:
            path, _ = self._files.pop(0)
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("recording: cannot delete %s to stay within record_max_bytes: %s", path, one_line(exc))
            self.files_deleted += 1

    def _lose(self, rows: int, why: str, kind: str) -> None:
        self.rows_lost += rows
        if kind not in self._warned:  # once per kind: after that, the status line counts them
            self._warned.add(kind)
            log.warning("recording: %d rows not recorded: %s", rows, why)


def record_files(folder: Path) -> list[Path]:
    """The recording files in a folder, oldest first."""
    found = [(int(match.group(1)), path) for path in folder.iterdir() if (match := _NAME.match(path.name))]
    return [path for _, path in sorted(found)]


class _Flush:
    """A request to the writer to write everything waiting, and say when it has."""

    def __init__(self) -> None:
        self.done = threading.Event()


_STOP = object()


class Recorder:
    """The writer thread and its bounded queue. `on_cloud_rows` is the router's hook (never blocks);
    `close` writes what waits and stops the thread."""

    def __init__(
        self, store: RecordFolder, queue_batches: int = QUEUE_BATCHES, flush_seconds: float = FLUSH_SECONDS
    ) -> None:
        self.store = store
        self.flush_seconds = flush_seconds
        self._queue: queue.Queue[object] = queue.Queue(queue_batches)
        self._rows = 0
        self._dropped = 0
        self._warned: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="offload-recorder", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, folder: Path, max_bytes: int) -> Recorder:
        """A recorder writing into `folder` (made if missing) within `max_bytes` of files."""
        return cls(RecordFolder(folder, max_bytes))

    def on_cloud_rows(self, model: RoutedModel, inputs: Arrays, outputs: Arrays, cloud_version: str) -> None:
        """Queue the rows for the writer, or drop and count them: called on the event loop, never waits."""
        rows = CloudRows(model.name, model.version, model.cloud_model, cloud_version, inputs, outputs)
        count = rows.rows
        if count == 0:
            return
        if any(array.dtype.hasobject for array in rows.arrays().values()):
            self._drop(count, f"model {model.name!r} has BYTES tensors, which an .npz recording does not hold")
            return
        try:
            self._queue.put_nowait(rows)
        except queue.Full:
            self._drop(count, "the writer is behind (its queue is full); rows are dropped while it is")
            return
        self._rows += count

    def _drop(self, rows: int, why: str) -> None:
        self._dropped += rows
        if why not in self._warned:  # once per reason: after that, the status line counts them
            self._warned.add(why)
            log.warning("recording: %s", why)

    def stats(self) -> RecordingStats:
        store = self.store
        return RecordingStats(
            folder=str(store.folder),
            rows=self._rows,
            dropped=self._dropped + store.rows_lost,
            rows_written=store.rows_written,
            bytes_written=store.bytes_written,
            files_written=store.files_written,
            files_deleted=store.files_deleted,
            bytes_on_disk=store.bytes_on_disk,
        )

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every row queued before this call is in a file; False if that took past `timeout`.
        Blocking: call it off the event loop."""
        request = _Flush()
        self._queue.put(request, timeout=timeout)
        return request.done.wait(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Write everything queued and waiting, then stop the writer. Blocking: call it off the event loop."""
        if self._thread.is_alive():
            self._queue.put(_STOP, timeout=timeout)
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            # Rows that have waited long enough go to disk, however busy the queue is.
            self._guarded(functools.partial(self.store.flush, self.flush_seconds))
            try:
                item = self._queue.get(timeout=self.store.next_flush_in(self.flush_seconds))
            except queue.Empty:
                continue
            if item is _STOP:
                self._guarded(self.store.flush)
                return
            if isinstance(item, _Flush):
                self._guarded(self.store.flush)
                item.done.set()
            elif isinstance(item, CloudRows):
                self._guarded(functools.partial(self.store.add, item))

    def _guarded(self, work: Callable[[], None]) -> None:
        # The writer outlives any one failure (RecordFolder counts failed writes; this is for the unforeseen).
        try:
            work()
        except Exception:
            log.exception("recording: the writer failed; it goes on with the next rows")


@dataclass(frozen=True)
class Records:
    """A model's recorded rows: the inputs as sent, the cloud's outputs, and rows per version."""

    inputs: Arrays
    outputs: Arrays
    files: int
    model_versions: Mapping[str, int]  # rows per edge model version that sent them
    cloud_versions: Mapping[str, int]  # rows per cloud model version that answered them

    @property
    def rows(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])


def read_records(folder: Path, model: str) -> Records:
    """Every recorded row of `model` in `folder`, oldest first."""
    if not folder.is_dir():
        raise ConfigurationError(f"{folder}: no such recording folder")
    parts: list[Arrays] = []
    counts: dict[str, dict[str, int]] = {"model_version": {}, "cloud_version": {}}
    for path in record_files(folder):
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"{path}: not a readable recording file: {one_line(exc)}") from exc
        if str(arrays.get(META + "model")) != model:
            continue
        if int(arrays.get(META + "format", -1)) != FORMAT:
            raise ConfigurationError(f"{path}: recording format {arrays.get(META + 'format')}, expected {FORMAT}")
        data = {name: array for name, array in arrays.items() if not name.startswith(META)}
        rows = next(iter(data.values())).shape[0]
        for kind, count in counts.items():
            version = str(arrays[META + kind])
            count[version] = count.get(version, 0) + rows
        if parts and (set(data) != set(parts[0]) or any(data[n].shape[1:] != parts[0][n].shape[1:] for n in data)):
            raise ConfigurationError(f"{path}: its tensors differ from the earlier files' of {model!r}")
        parts.append(data)
    if not parts:
        raise ConfigurationError(f"{folder}: no recorded rows of model {model!r}")
    joined = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    return Records(
        inputs={name.removeprefix(INPUT): array for name, array in joined.items() if name.startswith(INPUT)},
        outputs={name.removeprefix(OUTPUT): array for name, array in joined.items() if name.startswith(OUTPUT)},
        files=len(parts),
        model_versions=counts["model_version"],
        cloud_versions=counts["cloud_version"],
    )
