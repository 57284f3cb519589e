"""The manifest of a model repository published over HTTP: its version, its models and every file's size and SHA-256.

A repository folder (offload.oip.repository) becomes a rollout source by putting it behind any HTTP server or
object store with its manifest beside the model folders: `offload manifest DIR` writes `DIR/manifest.json`,
and an edge agent started with `--model-repository-url URL` reads `URL/manifest.json` and fetches `URL/PATH`
for the files it needs (offload.edge.rollout). Publish the files first and the manifest last, so that an agent
never reads a manifest whose files are not there yet.

    {
      "format": 1,
      "version": "sha256:4f0c2a9e1b7d3a55",      # the repository's version: any text; by default a digest of
      "models": [                                #   every file's path and SHA-256, so any change makes a new one
        {
          "name": "digits",                      # the model's name and version, as its model.toml says
          "version": "2",
          "folder": "digits",                    # its folder in the repository
          "files": [                             # every file of the folder, paths from the repository's root
            {"path": "digits/edge.onnx", "size": 36039, "sha256": "9c1d...64 hex digits"},
            {"path": "digits/model.toml", "size": 1176, "sha256": "..."}
          ]
        }
      ]
    }

Paths are '/'-separated and relative, inside their model's folder, with no '.', '..' or empty parts: a manifest
cannot make a reader write outside the folder it fetches into. Hidden files (names starting with '.') are left out.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from offload.oip.errors import ConfigurationError
from offload.oip.repository import CONFIG_FILE, load_repository

MANIFEST_FILE = "manifest.json"
_CHUNK = 1024 * 1024
# Control characters and backslashes have no place in a published path (a backslash is a separator on Windows).
_UNSAFE = re.compile(r"[\x00-\x1f\x7f\\]")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ManifestFile(_Strict):
    path: Annotated[str, Field(min_length=1, max_length=1024)]
    size: Annotated[int, Field(ge=0)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

    @field_validator("path")
    @classmethod
    def _safe(cls, value: str) -> str:
        parts = value.split("/")
        if _UNSAFE.search(value) or any(part in ("", ".", "..") for part in parts):
            raise ValueError(
                f"path {value!r} must be relative and '/'-separated, without '.', '..', empty parts, "
                "backslashes or control characters"
            )
        return value

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.path.split("/"))


class ManifestModel(_Strict):
    name: Annotated[str, Field(min_length=1)]
    version: Annotated[str, Field(min_length=1)]
    folder: Annotated[str, Field(min_length=1)]
    files: tuple[ManifestFile, ...]

    @model_validator(mode="after")
    def _files_in_folder(self) -> Self:
        for file in self.files:
            if len(file.parts) < 2 or file.parts[0] != self.folder:
                raise ValueError(f"model {self.name!r}: file {file.path!r} is not inside its folder {self.folder!r}")
        if self.config_path not in {file.path for file in self.files}:
            raise ValueError(f"model {self.name!r}: its {CONFIG_FILE} ({self.config_path!r}) is not listed")
        return self

    @property
    def config_path(self) -> str:
        return f"{self.folder}/{CONFIG_FILE}"


class Manifest(_Strict):
    format: Literal[1] = 1
    version: Annotated[str, Field(min_length=1, max_length=256)]
    models: Annotated[tuple[ManifestModel, ...], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique(self) -> Self:
        for what, values in (
            ("model names", [model.name for model in self.models]),
            ("model folders", [model.folder for model in self.models]),
            ("file paths", [file.path for model in self.models for file in model.files]),
        ):
            repeated = sorted(value for value, count in Counter(values).items() if count > 1)
            if repeated:
                raise ValueError(f"{what} listed twice: {repeated}")
        return self

    def file(self, path: str) -> ManifestFile | None:
        """The entry of the file at `path` (relative to the repository), if the manifest lists it."""
        return next((file for model in self.models for file in model.files if file.path == path), None)

    def model(self, name: str) -> ManifestModel | None:
        return next((model for model in self.models if model.name == name), None)

    @classmethod
    def parse(cls, data: bytes, where: str) -> Manifest:
        """A manifest from its JSON; ConfigurationError naming `where` and every problem otherwise."""
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in error['loc']) or '(top)'}: {error['msg']}" for error in exc.errors()
            )
            raise ConfigurationError(f"{where}: not a valid {MANIFEST_FILE}: {problems}") from exc

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


def file_digest(path: Path) -> tuple[int, str]:
    """A file's size and SHA-256 (hex), read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def build_manifest(root: Path, version: str | None = None) -> Manifest:
    """The manifest of the repository at `root` (validated as the servers read it: ConfigurationError if it is
    not one). `version` defaults to a digest of every file's path and SHA-256."""
    base = root.resolve()
    models = []
    for name, entry in load_repository(root).items():
        try:
            folder = entry.folder.relative_to(base).as_posix()
        except ValueError:
            raise ConfigurationError(
                f"{entry.folder}: model {name!r} is a link to a folder outside {root}; copy the folder in instead"
            ) from None
        files = []
        for path in _visible_files(entry.folder):
            size, sha256 = file_digest(path)
            relative = PurePosixPath(folder, path.relative_to(entry.folder).as_posix())
            files.append(ManifestFile(path=str(relative), size=size, sha256=sha256))
        models.append(ManifestModel(name=name, version=entry.config.version, folder=folder, files=tuple(files)))
    if version is None:
        lines = "".join(f"{file.path}\0{file.sha256}\n" for model in models for file in model.files)
        version = "sha256:" + hashlib.sha256(lines.encode()).hexdigest()[:16]
    return Manifest(version=version, models=tuple(models))


def write_manifest(root: Path, version: str | None = None) -> tuple[Path, Manifest]:
    """Write `root/manifest.json` for the repository at `root` (replacing any, atomically); returns it and its path."""
    manifest = build_manifest(root, version)
    target = root / MANIFEST_FILE
    partial = root / f".{MANIFEST_FILE}.partial"
    partial.write_text(manifest.to_json())
    os.replace(partial, target)
    return target, manifest


def _visible_files(folder: Path) -> list[Path]:
    """Every file under `folder`, hidden ones (any part of the path starting with '.') left out, sorted."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
