"""The model cache folder: the last good repository fetched from model_repository_url, kept across restarts.

    <model_cache_dir>/
      current.json          names the kept repository's folder, its version, the manifest's ETag, its files
      repository-XXXXXXXX/  a repository folder: manifest.json (as served) beside the model folders, holding
                            only the files the edge needs
      lock                  locked while an agent uses the folder: one agent per folder

A new version is written into a fresh repository-* folder; rewriting current.json (atomically, by rename) is
what makes it the kept one, so a crash at any point leaves the old or the new one kept, whole. Folders that
current.json does not name are leftovers, removed when the cache opens and after each new one is kept.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pydantic import BaseModel, ConfigDict, ValidationError

from offload.oip.errors import ConfigurationError
from offload.oip.manifest import MANIFEST_FILE, Manifest, file_digest

CURRENT_FILE = "current.json"
_PREFIX = "repository-"


class KeptRepositoryError(Exception):
    """The kept repository cannot be used (missing or changed files, an unreadable record)."""


class _Current(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    folder: str
    version: str
    etag: str | None
    files: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class KeptRepository:
    folder: Path
    manifest: Manifest
    etag: str | None  # the manifest's, as served: the next look asks If-None-Match with it
    files: frozenset[str]  # the manifest's paths held in the folder


class ModelCache:
    """One agent's model cache folder (created if missing, locked while open)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            root.mkdir(parents=True, exist_ok=True)
            self._lock: IO[bytes] | None = (root / "lock").open("wb")
        except OSError as exc:
            raise ConfigurationError(
                f"model_cache_dir {root}: cannot be created or written ({exc.strerror}); give the agent a writable "
                "folder (--model-cache-dir)"
            ) from exc
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise ConfigurationError(
                f"model_cache_dir {root} is in use by another edge agent; give each agent its own (--model-cache-dir)"
            ) from None
        self._remove_leftovers()

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the lock
            self._lock = None

    def kept(self) -> KeptRepository | None:
        """The kept repository with every file checked against its manifest, or None if none was kept yet;
        KeptRepositoryError if it cannot be used. Blocking (it reads every file): call it from a thread."""
        current = self._current()
        if current is None:
            return None
        folder = self.root / current.folder
        try:
            manifest = Manifest.parse((folder / MANIFEST_FILE).read_bytes(), str(folder / MANIFEST_FILE))
        except (OSError, ConfigurationError) as exc:
            raise KeptRepositoryError(f"{folder}: its {MANIFEST_FILE} cannot be read: {exc}") from exc
        for path in current.files:
            listed = manifest.file(path)
            try:
                size, sha256 = file_digest(folder / path)
            except OSError as exc:
                raise KeptRepositoryError(f"{folder / path}: cannot be read ({exc.strerror})") from exc
            if listed is None or (size, sha256) != (listed.size, listed.sha256):
                raise KeptRepositoryError(f"{folder / path}: changed on disk since it was kept")
        return KeptRepository(folder, manifest, current.etag, frozenset(current.files))

    def new_folder(self) -> Path:
        """An empty folder to write a new version into (kept by `keep`, else removed with `discard`)."""
        return Path(tempfile.mkdtemp(prefix=_PREFIX, dir=self.root))

    def keep(
        self, folder: Path, manifest: Manifest, raw: bytes, etag: str | None, files: frozenset[str]
    ) -> KeptRepository:
        """Make `folder` (from `new_folder`, holding `files` of `manifest`) the kept repository, and remove the
        previous one. Blocking: call it from a thread."""
        _write_synced(folder / MANIFEST_FILE, raw)
        record = _Current(folder=folder.name, version=manifest.version, etag=etag, files=tuple(sorted(files)))
        partial = self.root / f"{CURRENT_FILE}.partial"
        _write_synced(partial, record.model_dump_json(indent=2).encode())
        os.replace(partial, self.root / CURRENT_FILE)
        _sync_folder(self.root)
        self._remove_leftovers()
        return KeptRepository(folder, manifest, etag, files)

    def discard(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)

    def _current(self) -> _Current | None:
        path = self.root / CURRENT_FILE
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeptRepositoryError(f"{path}: cannot be read ({exc.strerror})") from exc
        try:
            current = _Current.model_validate_json(text)
        except ValidationError as exc:
            raise KeptRepositoryError(f"{path}: not a record this agent wrote ({exc.error_count()} problems)") from exc
        if not current.folder.startswith(_PREFIX) or "/" in current.folder:
            raise KeptRepositoryError(f"{path}: names {current.folder!r}, not one of its repository folders")
        return current

    def _remove_leftovers(self) -> None:
        """Remove repository folders current.json does not name, and half-written records."""
        try:
            current = self._current()
        except KeptRepositoryError:
            return  # kept() says what is wrong; nothing is removed on a guess
        keep = current.folder if current is not None else None
        for path in self.root.iterdir():
            if path.name.startswith(_PREFIX) and path.name != keep and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.name.endswith(".partial"):
                path.unlink(missing_ok=True)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX: fsync the folder itself)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
