"""What one edge model run costs when the CPU's caches are warm, and when they are not.

A served request reaches the model after the gRPC machinery, the event loop and other processes have run on
the same cores, so the run finds little of its code and data in the caches. This times runs of one row of the
demo edge model (the agent's session options) back to back, after a short pause, and after reading a buffer
larger than the caches, and prints the mean of each.

    python benchmarks/cold_runs.py [--runs 3000]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from offload.edge.config import EdgeSection
from offload.edge.onnx_model import OnnxModel
from offload.models import DEMO_REPOSITORY
from offload.oip.repository import load_repository

FLUSH_BYTES = 32 * 1024 * 1024  # more than this machine's last-level cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3000, help="runs per setting (default 3000)")
    runs = parser.parse_args().runs
    entry = load_repository(DEMO_REPOSITORY)["digits"]
    section = entry.section("edge", EdgeSection)
    assert section is not None
    model = OnnxModel(entry.artifact_path(section.artifact), section)
    inputs = {"pixels": np.zeros((1, 64), np.float32)}
    other = np.ones(FLUSH_BYTES // 8)
    between: dict[str, Callable[[], object]] = {
        "back to back": lambda: None,
        "after a 0.5 ms pause": lambda: time.sleep(0.0005),
        f"after reading {FLUSH_BYTES >> 20} MiB": other.sum,
    }
    for _ in range(100):
        model.predict(inputs)
    print("| before each run | mean us per run |")
    print("|---|---:|")
    for name, step in between.items():
        total = 0.0
        for _ in range(runs):
            step()
            started = time.perf_counter()
            model.predict(inputs)
            total += time.perf_counter() - started
        print(f"| {name} | {total / runs * 1e6:.1f} |")


if __name__ == "__main__":
    main()
