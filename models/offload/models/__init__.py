"""Bundled demo models: a model repository the demo and the servers use by default."""

from pathlib import Path

DEMO_REPOSITORY = Path(__file__).resolve().parent / "repository"
"""The bundled model repository (one folder per model)."""

__all__ = ["DEMO_REPOSITORY"]
