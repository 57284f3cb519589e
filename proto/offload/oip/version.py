"""The version every Offload server reports in ServerMetadata: the installed package's, from one place."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    SERVER_VERSION = version("offload")
except PackageNotFoundError:  # the source folders on PYTHONPATH without an install: no version to read
    SERVER_VERSION = "0+unknown"
