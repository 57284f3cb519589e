"""Models rolled out to the device over HTTP: look at the published repository, fetch what changed, verify
it, load and warm it, swap it in, keep it on disk.

With `model_repository_url`, the agent's models come from a repository published with its manifest
(offload.oip.manifest) on any HTTP server or object store. Every `model_poll_seconds` it asks for the
manifest with `If-None-Match` (a 304 costs nothing more). A new manifest is rolled out in steps, and a
failure at any step leaves the models being served as they are, with one WARNING saying what failed and
what to do:

1. fetch: each model's model.toml, then the artifact its [edge] section names (other files, such as the
   cloud's, stay on the server), into a fresh folder of the model cache. A file whose path and SHA-256 the
   kept repository already has is linked from it instead of fetched again. Sizes are checked against the
   manifest before and while reading, the total against `model_download_max_bytes` before any download,
   each checksum at the end (offload.edge.downloads, which also retries with backoff).
2. load and warm: models whose files changed (or that are new) are loaded and run once on a row of zeros,
   in a worker thread, while the agent keeps serving; unchanged models are kept as they are.
3. keep: the new folder becomes the kept repository (offload.edge.model_cache), so that a device that
   restarts, online or not, serves it at once.
4. swap: `Router.replace_models` puts the new model set in place in one step. Calls in flight finish on
   the models they started with, calls that start after get the new ones, none fails.

A manifest rejected for its own content (a model that does not load or warm up, an invalid manifest, more
bytes than allowed) is not tried again until it changes; a download that failed (a network error, a
checksum mismatch, a file cut short) is tried again at the next look.
"""

from __future__ import annotations

import asyncio
import logging
import os
import posixpath
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from offload.edge.config import EdgeSection
from offload.edge.downloads import DownloadError, DownloadPolicy, InvalidManifest, RepositoryClient, Sleep
from offload.edge.model_cache import KeptRepository, KeptRepositoryError, ModelCache
from offload.edge.settings import EdgeSettings
from offload.oip.errors import ConfigurationError, one_line
from offload.oip.manifest import Manifest, ManifestFile
from offload.oip.repository import load_model
from offload.router.models import RoutedModel

log = logging.getLogger(__name__)


# Loads the [edge] models of a repository folder, taking those in the mapping as they are
# (offload.edge.agent.load_edge_models).
Loader = Callable[[Path, Mapping[str, RoutedModel] | None], dict[str, RoutedModel]]


class ModelTable(Protocol):
    """Where rolled-out models go: the router (`Router.replace_models`)."""

    def replace_models(self, models: Mapping[str, RoutedModel]) -> None: ...


class Outcome(StrEnum):
    UNCHANGED = "unchanged"
    UPDATED = "updated"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class RolloutStats:
    """What the rollout has done since the agent started."""

    version: str | None  # the repository version served; None while model_repository is served instead
    checks: int  # looks at the published manifest
    unchanged: int  # looks that found nothing new (a 304, or the manifest being served or rejected)
    updates: int  # new versions swapped in
    failures: int  # looks that failed (the models served stayed as they were)
    files_downloaded: int
    bytes_downloaded: int
    last_failure: str | None


@dataclass(slots=True)
class _Counts:
    checks: int = 0
    unchanged: int = 0
    updates: int = 0
    failures: int = 0
    files_downloaded: int = 0
    bytes_downloaded: int = 0
    last_failure: str | None = None


class _Rejected(Exception):
    """A new version that cannot be served; `final`: the manifest's content is at fault, so the same
    manifest is not tried again."""

    def __init__(self, message: str, final: bool) -> None:
        super().__init__(message)
        self.final = final


class ModelRollout:
    """Keeps the models of the repository published at `client.url` served, through `cache`."""

    def __init__(
        self, client: RepositoryClient, cache: ModelCache, load: Loader, max_bytes: int, sleep: Sleep = asyncio.sleep
    ) -> None:
        self._client = client
        self._cache = cache
        self._load_models = load
        self.max_bytes = max_bytes
        self._sleep = sleep
        self._kept: KeptRepository | None = None  # what is served, when it came from the URL
        self._models: dict[str, RoutedModel] = {}
        self._etag: str | None = None  # sent as If-None-Match: the last manifest served or rejected for good
        self._rejected: Manifest | None = None
        self._counts = _Counts()

    @classmethod
    def open(
        cls, settings: EdgeSettings, load: Loader, policy: DownloadPolicy | None = None, sleep: Sleep = asyncio.sleep
    ) -> ModelRollout:
        """The rollout the settings describe (model_repository_url must be set); ConfigurationError when the
        model cache folder cannot be used."""
        if not settings.model_repository_url:
            raise ConfigurationError("model_repository_url is not set: there is nothing to roll out")
        cache = ModelCache(settings.model_cache_folder())
        client = RepositoryClient(settings.model_repository_url, policy, sleep)
        return cls(client, cache, load, settings.model_download_max_bytes, sleep)

    @property
    def url(self) -> str:
        return self._client.url

    def stats(self) -> RolloutStats:
        counts = self._counts
        return RolloutStats(
            version=self._kept.manifest.version if self._kept is not None else None,
            checks=counts.checks,
            unchanged=counts.unchanged,
            updates=counts.updates,
            failures=counts.failures,
            files_downloaded=counts.files_downloaded,
            bytes_downloaded=counts.bytes_downloaded,
            last_failure=counts.last_failure,
        )

    async def close(self) -> None:
        await self._client.close()
        self._cache.close()

    async def start(self, seed: Path) -> dict[str, RoutedModel]:
        """The models to start serving: the kept repository's (no network needed), else the URL's, else
        those of `seed` (model_repository) until a download succeeds."""
        kept = await self._kept_repository()
        if kept is not None:
            try:
                models = await asyncio.to_thread(self._load_models, kept.folder, None)
            except Exception as exc:  # a kept model that no longer loads (onnxruntime changed, say)
                log.warning(
                    "model rollout: the kept repository %s does not load (%s); fetching %s again",
                    kept.folder,
                    one_line(exc),
                    self.url,
                )
            else:
                self._kept, self._models, self._etag = kept, models, kept.etag
                log.info(
                    "model rollout: serving the kept repository version %s (%s); looking for a newer one at %s",
                    kept.manifest.version,
                    kept.folder,
                    self.url,
                )
                return models
        if await self.check(None) is Outcome.UPDATED:
            return self._models
        log.warning(
            "model rollout: no repository from %s yet and none kept in %s; serving model_repository %s until a "
            "download succeeds",
            self.url,
            self._cache.root,
            seed,
        )
        self._models = await asyncio.to_thread(self._load_models, seed, None)
        return self._models

    async def run(self, table: ModelTable, poll_seconds: float) -> None:
        """Look every `poll_seconds` and swap new versions into `table`, until cancelled."""
        while True:
            await self._sleep(poll_seconds)
            try:
                await self.check(table)
            except Exception:  # a bug must not end the looking: the models served stay as they are
                log.exception("model rollout: an unexpected failure; still serving what was served, looking again")

    async def check(self, table: ModelTable | None) -> Outcome:
        """Look at the published manifest once; roll a new version out into `table` (None: just keep it,
        at start-up). Never raises for a failed rollout: it is logged and counted."""
        counts = self._counts
        counts.checks += 1
        try:
            published = await self._client.manifest(self._etag)
        except InvalidManifest as exc:
            if exc.etag is not None:
                self._etag = exc.etag  # not asked for again until it changes
            return self._failed(str(exc), None)
        except DownloadError as exc:
            return self._failed(str(exc), None)
        if published is None:
            counts.unchanged += 1
            return Outcome.UNCHANGED
        manifest = published.manifest
        if manifest in (self._served_manifest, self._rejected):
            # The server answered in full (no ETag, or a new one) with a manifest already dealt with.
            self._etag = published.etag
            counts.unchanged += 1
            return Outcome.UNCHANGED
        try:
            folder = await asyncio.to_thread(self._cache.new_folder)
        except OSError as exc:
            return self._failed(f"{self._cache.root}: {one_line(exc)}; check model_cache_dir", manifest.version)
        try:
            files = await self._fetch(manifest, folder)
            models = await self._load(folder, manifest)
            kept = await self._keep(folder, manifest, published.raw, published.etag, files)
        except _Rejected as exc:
            await asyncio.to_thread(self._cache.discard, folder)
            if exc.final:
                self._rejected, self._etag = manifest, published.etag
            return self._failed(str(exc), manifest.version)
        except BaseException:
            await asyncio.to_thread(self._cache.discard, folder)
            raise
        previous, self._kept, self._models = self._models, kept, models
        self._rejected, self._etag = None, published.etag
        if table is not None:
            table.replace_models(models)
        counts.updates += 1
        log.info(
            "model rollout: serving repository version %s from %s (%s)%s",
            manifest.version,
            self.url,
            _changes(previous, models),
            "; calls in flight finish on the models they started with" if table is not None else "",
        )
        return Outcome.UPDATED

    @property
    def _served_manifest(self) -> Manifest | None:
        return self._kept.manifest if self._kept is not None else None

    def _failed(self, message: str, version: str | None) -> Outcome:
        counts = self._counts
        counts.failures += 1
        counts.last_failure = message
        served = f"version {self._kept.manifest.version}" if self._kept is not None else "model_repository"
        what = f"repository version {version} from {self.url} rejected" if version else f"cannot read {self.url}"
        log.warning("model rollout: %s (still serving %s): %s", what, served, message)
        return Outcome.FAILED

    async def _fetch(self, manifest: Manifest, folder: Path) -> frozenset[str]:
        """Put every file the edge needs into `folder`: each model.toml, then each [edge] artifact."""
        budget = _Budget(self.max_bytes)
        configs = [manifest.file(model.config_path) for model in manifest.models]
        await self._obtain([file for file in configs if file is not None], folder, budget)
        artifacts: dict[str, ManifestFile] = {}
        for model in manifest.models:
            try:
                entry = await asyncio.to_thread(load_model, folder / model.folder)
                section = entry.section("edge", EdgeSection)
            except ConfigurationError as exc:
                raise _Rejected(f"{exc}; fix the model and publish it again", final=True) from exc
            if section is None:
                continue  # a cloud-only model
            path = posixpath.normpath(posixpath.join(model.folder, section.artifact))
            listed = manifest.file(path)
            if listed is None:
                raise _Rejected(
                    f"model {model.name!r}: its [edge] artifact {path!r} is not in the manifest; write the manifest "
                    "again with `offload manifest DIR` and publish it",
                    final=True,
                )
            artifacts[path] = listed
        have = {file.path for file in configs if file is not None}
        await self._obtain([file for path, file in artifacts.items() if path not in have], folder, budget)
        return frozenset(have | artifacts.keys())

    async def _obtain(self, files: list[ManifestFile], folder: Path, budget: _Budget) -> None:
        """Link each file from the kept repository where it has it unchanged, else download it."""
        kept = self._kept
        fetch = []
        for file in files:
            source = kept.folder / file.path if kept is not None and _holds(kept, file) else None
            try:
                placed = await asyncio.to_thread(_place, folder / file.path, source)
            except OSError as exc:  # a path that is also a folder's, a full disk
                raise _Rejected(f"{file.path} cannot be written in {folder}: {one_line(exc)}", final=False) from exc
            if not placed:
                fetch.append(file)
        budget.spend(sum(file.size for file in fetch))
        for file in fetch:
            try:
                await self._client.download(file, folder / file.path)
            except DownloadError as exc:
                raise _Rejected(str(exc), final=False) from exc
            self._counts.files_downloaded += 1
            self._counts.bytes_downloaded += file.size

    async def _load(self, folder: Path, manifest: Manifest) -> dict[str, RoutedModel]:
        """Load the models in `folder` (those unchanged since the served manifest kept as they are) and warm
        up the ones loaded, in a worker thread."""
        served = self._served_manifest
        keep = {
            name: model
            for name, model in self._models.items()
            if served is not None and served.model(name) is not None and served.model(name) == manifest.model(name)
        }
        return await asyncio.to_thread(_load_and_warm, self._load_models, folder, keep)

    async def _keep(
        self, folder: Path, manifest: Manifest, raw: bytes, etag: str | None, files: frozenset[str]
    ) -> KeptRepository:
        try:
            return await asyncio.to_thread(self._cache.keep, folder, manifest, raw, etag, files)
        except OSError as exc:
            raise _Rejected(
                f"it cannot be kept in {self._cache.root} ({one_line(exc)}); check the free space and the "
                "permissions of model_cache_dir",
                final=False,
            ) from exc

    async def _kept_repository(self) -> KeptRepository | None:
        try:
            return await asyncio.to_thread(self._cache.kept)
        except KeptRepositoryError as exc:
            log.warning("model rollout: the kept repository cannot be used (%s); fetching %s again", exc, self.url)
            return None


class _Budget:
    """The bytes one rollout may still download."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.spent = 0

    def spend(self, size: int) -> None:
        if self.spent + size > self.max_bytes:
            raise _Rejected(
                f"the edge needs {self.spent + size} bytes of its files, more than model_download_max_bytes "
                f"({self.max_bytes}); raise it or publish smaller models",
                final=True,
            )
        self.spent += size


def _holds(kept: KeptRepository, file: ManifestFile) -> bool:
    listed = kept.manifest.file(file.path)
    return file.path in kept.files and listed is not None and listed.sha256 == file.sha256


def _place(target: Path, source: Path | None) -> bool:
    """Make `target`'s folder; link (or copy) `source` there if given. False: it must be downloaded."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source is None:
        return False
    try:
        os.link(source, target)
    except OSError:
        try:
            shutil.copyfile(source, target)
        except OSError:
            return False
    return True


def _load_and_warm(load: Loader, folder: Path, keep: Mapping[str, RoutedModel]) -> dict[str, RoutedModel]:
    try:
        models = load(folder, keep)
    except Exception as exc:  # ConfigurationError mostly; a model file can make a library raise anything
        raise _Rejected(f"it does not load: {one_line(exc)}; fix the model and publish it again", final=True) from exc
    for name, model in models.items():
        if keep.get(name) is model:
            continue
        try:
            model.warm_up()
        except Exception as exc:
            raise _Rejected(
                f"model {name!r} v{model.version} failed its warm-up (one row of zeros shaped as model.toml declares "
                f"the inputs): {one_line(exc)}; check that model.toml's inputs and outputs are what the model takes "
                "and gives, and publish it again",
                final=True,
            ) from exc
    return models


def _changes(before: Mapping[str, RoutedModel], after: Mapping[str, RoutedModel]) -> str:
    """What a swap changed, for the log: "digits v1 -> v2, faces v3 (new), old v1 (removed), 1 unchanged"."""
    parts = []
    unchanged = 0
    for name, model in sorted(after.items()):
        old = before.get(name)
        if old is model:
            unchanged += 1
        elif old is None:
            parts.append(f"{name} v{model.version} (new)")
        else:
            parts.append(f"{name} v{old.version} -> v{model.version}")
    parts += [f"{name} v{model.version} (removed)" for name, model in sorted(before.items()) if name not in after]
    if unchanged:
        parts.append(f"{unchanged} unchanged")
    return ", ".join(parts)
