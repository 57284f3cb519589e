"""Bundled models: the demo's model repository the demo and the servers use by default, and a benchmark one."""

from pathlib import Path

DEMO_REPOSITORY = Path(__file__).resolve().parent / "repository"
"""The bundled model repository (one folder per model)."""

BENCHMARK_REPOSITORY = Path(__file__).resolve().parent / "benchmarks"
"""Models the benchmarks use beside the demo's (models/train_digits_cnn.py), kept out of the demo repository."""

__all__ = ["BENCHMARK_REPOSITORY", "DEMO_REPOSITORY"]
