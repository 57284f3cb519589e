"""Quantization benchmark: what `offload quantize` buys, dynamic and static, on an edge model big enough to show it.

For each model (default: the benchmark CNN `digits_cnn`, 149,722 weights, and the demo's
`digits` MLP, 8,250) it copies the model's repository to a temporary folder and runs
`offload quantize` twice on it (dynamic; static QDQ with the validation split as calibration
rows), each writing its own new folder, with the threshold recalibrated on the validation split
for the offload share the current threshold gives there. It then times the float model and
both 8-bit models together (a bare `InferenceSession.run`, the [edge] section's threads, the
three models taking turns run by run so machine load hits them alike) at batch 1 and 64, and
reports file size, p50 (and p90) latency, and on the test split (held out: thresholds chosen on
validation, measured on test) edge accuracy, routed accuracy, offload share and agreement with
the float model. With --write-results it replaces its section of benchmarks/RESULTS.md.

    python benchmarks/quantization.py                    # print the section
    python benchmarks/quantization.py --write-results    # and write it into benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime

from offload.edge.config import EdgeSection
from offload.models import BENCHMARK_REPOSITORY, DEMO_REPOSITORY
from offload.oip.repository import load_model
from offload.tools.calibrate import load_inputs
from offload.tools.quantize import (
    Figures,
    QuantizeOptions,
    QuantizeResult,
    QuantizeSettings,
    run_quantize,
    time_runs,
)
from results_file import RESULTS, write_section

HEADING = "## Quantization"
HELD_OUT = "held out: thresholds chosen on validation, measured on test"
BATCHES = (1, 64)
MODELS = (f"{BENCHMARK_REPOSITORY}:digits_cnn", f"{DEMO_REPOSITORY}:digits")


@dataclass(frozen=True)
class Variant:
    label: str
    settings: QuantizeSettings


VARIANTS = (
    Variant("dynamic", QuantizeSettings(mode="dynamic")),
    Variant("static", QuantizeSettings(mode="static")),
)


@dataclass(frozen=True)
class Row:
    """One edge model file's line of the table."""

    label: str
    path: Path
    threshold: float
    test: Figures
    ops: frozenset[str] = frozenset()


def _quantize(repository: Path, model: str, variant: Variant, out: Path) -> QuantizeResult:
    folder = repository / model
    options = QuantizeOptions(
        repository=repository,
        model=model,
        data=folder / "validation.npz",
        test_data=folder / "test.npz",
        settings=variant.settings,
        calibration_data=folder / "validation.npz" if variant.settings.mode == "static" else None,
        out_repository=out,
        name=f"{model}_{variant.label}",
        latency_runs=0,  # timed below, all three models together
    )
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        result = run_quantize(options)
    print(report.getvalue(), file=sys.stderr)
    return result


def _milliseconds(seconds: list[float], share: float) -> str:
    return f"{statistics.quantiles(seconds, n=100, method='inclusive')[round(share * 100) - 1] * 1000:.3f}"


def _speed(before: float, after: float) -> str:
    if abs(after / before - 1.0) < 0.05:
        return "about as fast"
    return f"{before / after:.1f}x as fast" if after < before else f"{after / before:.1f}x as slow"


def benchmark(repository: Path, model: str, runs: int) -> str:
    """The markdown table (and its notes) for one model."""
    with tempfile.TemporaryDirectory(prefix="offload-quantization-bench-") as work:
        source = Path(shutil.copytree(repository, Path(work) / "source"))
        out = Path(work) / "out"
        out.mkdir()
        results = [(variant, _quantize(source, model, variant, out)) for variant in VARIANTS]
        first = results[0][1]
        rows = [Row("float (as committed)", first.source_path, first.routing_before.threshold, first.splits[-1].before)]
        rows += [
            Row(
                f"8-bit, {variant.settings.describe()}",
                result.destination.artifact_path,
                result.routing_after.threshold,
                result.splits[-1].after,
                result.quantized_ops,
            )
            for variant, result in results
        ]
        entry = load_model(source / model)
        section = entry.section("edge", EdgeSection) or EdgeSection(artifact="")
        test_inputs, _ = load_inputs(source / model / "test.npz", entry.config.inputs)
        timings = {batch: time_runs([row.path for row in rows], section, test_inputs, batch, runs) for batch in BATCHES}
        sizes = [row.path.stat().st_size for row in rows]
    lines = [
        "| edge model | file size | p50 ms, batch 1 (p90) | p50 ms, batch 64 (p90) | threshold | edge accuracy "
        "| routed accuracy | offload | agreement with float |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for index, row in enumerate(rows):
        latency = " | ".join(
            f"{_milliseconds(timings[batch][index], 0.5)} ({_milliseconds(timings[batch][index], 0.9)})"
            for batch in BATCHES
        )
        test = row.test
        lines.append(
            f"| {row.label} | {sizes[index] / 1000:,.0f} kB ({sizes[index] / sizes[0]:.2f}x) | {latency} | "
            f"{row.threshold!r} | {test.edge_accuracy:.2%} | {test.routed_accuracy:.2%} | {test.offload_share:.1%} | "
            f"{test.agreement:.2%} |"
        )
    medians = {batch: [statistics.median(samples) for samples in timings[batch]] for batch in BATCHES}
    summary = []
    for (variant, _), index in zip(results, range(1, len(rows)), strict=True):
        speeds = ", ".join(f"{_speed(medians[batch][0], medians[batch][index])} at batch {batch}" for batch in BATCHES)
        slow = " (its convolutions became ConvInteger, slow in ONNX Runtime's CPU kernels)"
        summary.append(
            f"{variant.label}: {sizes[index] / sizes[0]:.2f}x the float file, p50 {speeds}"
            + (slow if "ConvInteger" in rows[index].ops else "")
        )
    validation, test = first.splits[0].before, first.splits[-1].before
    notes = (
        "; ".join(summary) + f". Thresholds recalibrated on the validation split ({validation.rows} rows) for "
        f"{first.target_offload:.1%} offloaded (what the committed threshold offloads there with the float model); "
        f"the figures are on the test split ({test.rows} rows; cloud alone {test.cloud_accuracy:.2%}). Latency: "
        f"{runs} runs per model and batch, {section.intra_op_threads} intra-op thread(s)."
    )
    return "\n".join(lines) + "\n\n" + notes


def _stored_numbers(folder: Path) -> int:
    """Weights and constants in the model's ONNX file."""
    entry = load_model(folder)
    section = entry.section("edge", EdgeSection)
    assert section is not None
    graph = onnx.load(str(entry.artifact_path(section.artifact))).graph
    return sum(math.prod(initializer.dims) for initializer in graph.initializer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Quantization benchmark: file size, ONNX Runtime latency (batch 1 and 64), edge and routed "
        "accuracy and offload share of the float edge model and its dynamic and static 8-bit versions made by "
        f"offload quantize ({HELD_OUT})."
    )
    parser.add_argument(
        "--model",
        action="append",
        metavar="REPOSITORY:NAME",
        help="a model to benchmark (repeatable; default: the benchmark CNN and the demo's digits)",
    )
    parser.add_argument("--runs", type=int, default=300, help="timed runs per model and batch (default 300)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file to write (benchmarks/RESULTS.md)")
    parser.add_argument("--write-results", action="store_true", help="replace this benchmark's section of --results")
    options = parser.parse_args(argv)
    if options.runs < 10:
        parser.error("--runs must be 10 or more")

    command = shlex.join(["python", "benchmarks/quantization.py", *(sys.argv[1:] if argv is None else argv)])
    sections = []
    for spec in options.model or MODELS:
        repository, _, model = spec.rpartition(":")
        if not repository or not model:
            parser.error(f"--model {spec!r}: expected REPOSITORY:NAME")
        table = benchmark(Path(repository), model, options.runs)
        sections.append(
            f"**{model}** ({_stored_numbers(Path(repository) / model):,} numbers in its float edge file)\n\n{table}"
        )
    text = (
        f"Command: `{command}`; run {datetime.date.today().isoformat()} on a shared {os.cpu_count()}-core CPU "
        f"({platform.processor() or platform.machine()}; Python {platform.python_version()}, ONNX Runtime "
        f"{onnxruntime.__version__}, cloud model on the CPU). Each model's float edge file and the two 8-bit versions "
        "`offload quantize` made of it (dynamic: int8 weights, activations quantized at run time; static: QDQ, "
        "int8 weights and activations, MinMax ranges from the validation split). Accuracy and offload are "
        f"{HELD_OUT}, each 8-bit model's answers taken one row at a time (as a one-row request gets them). "
        "**Latency figures are from a shared 2-core machine, where other work ran at the same time:** the models "
        "take turns run by run so load hits them alike, but absolute times are noisy; rerun on a quiet machine for "
        "figures to quote.\n\n" + "\n\n".join(sections)
    )
    print(f"{HEADING}\n\n{text}")
    if options.write_results:
        write_section(options.results, HEADING, text)
        print(f"\nwritten to {options.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
