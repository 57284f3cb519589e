"""Temperature fitting, calibration error, threshold choice and `offload calibrate` on the demo models."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from conftest import Processes
from offload.models import DEMO_REPOSITORY
from offload.oip.errors import ConfigurationError
from offload.oip.repository import load_model
from offload.router.calibration import (
    CalibrationError,
    expected_calibration_error,
    fit_temperature,
    oracle_correct,
    point_for_accuracy,
    point_for_offload,
    routing_curve,
    threshold_between,
    wilson_interval,
)
from offload.router.confidence import class_confidence, log_softmax
from offload.router.config import RoutedConfig
from offload.tools.calibrate import load_inputs, with_routing_values, write_routing
from offload.tools.cli import main
from support import reference

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
Split = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]


def _split(name: str, repository: Path = DEMO_REPOSITORY) -> Split:
    with np.load(repository / "digits" / f"{name}.npz") as data:
        return data["inputs"].astype(np.float32), data["labels"].astype(np.int64)


@pytest.fixture(scope="module")
def validation() -> Split:
    return _split("validation")


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """A copy of the demo repository that calibrate may rewrite."""
    return Path(shutil.copytree(DEMO_REPOSITORY, tmp_path / "repository"))


# --- statistics --------------------------------------------------------------------------------------------------


def test_wilson_interval_matches_known_values() -> None:
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_fit_temperature_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, size=(20_000, 5))
    # Labels drawn from softmax(logits / 2.5): the best temperature for these logits is 2.5.
    probs = np.exp(log_softmax(logits, 2.5))
    labels = (probs.cumsum(axis=1) > rng.random((len(logits), 1))).argmax(axis=1)
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.03)


def test_fit_temperature_stops_at_the_bounds_for_separable_data() -> None:
    logits = np.array([[2.0, 0.0], [0.0, 2.0]])
    # Always right: the sharper the better, down to the lower bound.
    assert fit_temperature(logits, np.array([0, 1])) == pytest.approx(0.05, rel=1e-3)
    with pytest.raises(ValueError, match="class indices"):
        fit_temperature(logits, np.array([0, 2]))


def test_expected_calibration_error_on_known_values() -> None:
    # Bin (0.8, 0.9]: confidence 0.9, accuracy 0.5; bin (0.5, 0.6]: confidence 0.6, accuracy 1.0.
    confidence = np.array([0.9, 0.9, 0.6, 0.6])
    correct = np.array([True, False, True, True])
    assert expected_calibration_error(confidence, correct, bins=10) == pytest.approx(0.4)
    # Probabilities: the row's largest is its confidence.
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    assert expected_calibration_error(probs, correct, bins=10) == pytest.approx(0.4)
    assert expected_calibration_error(np.array([1.0, 0.0]), np.array([True, False])) == 0.0


def test_temperature_scaling_reduces_calibration_error_on_the_demo_validation_set(validation: Split) -> None:
    pixels, labels = validation
    logits = reference.edge_scores(pixels).astype(np.float64)
    correct = logits.argmax(axis=1) == labels
    # The bundled edge model has its temperature folded into its weights already: refitting finds about 1.
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.05)
    # Made over- and under-confident (logits x3, x0.3), fitting undoes it and the error drops to the calibrated one.
    calibrated = expected_calibration_error(class_confidence(logits, "max_probability"), correct)
    for factor in (3.0, 0.3):
        distorted = logits * factor
        temperature = fit_temperature(distorted, labels)
        assert temperature == pytest.approx(factor, rel=0.05)
        before = expected_calibration_error(class_confidence(distorted, "max_probability"), correct)
        after = expected_calibration_error(
            class_confidence(distorted, "max_probability", temperature=temperature), correct
        )
        assert after < before
        assert after == pytest.approx(calibrated, abs=0.005)


# --- thresholds --------------------------------------------------------------------------------------------------


def test_routing_curve_keeps_ties_together_and_never_exceeds_the_offload_target() -> None:
    confidence = np.array([0.9, 0.2, 0.1, 0.2, 0.5, 0.2])
    edge = np.array([True, False, False, True, True, True])
    cloud = np.array([True, True, True, True, False, True])
    curve = routing_curve(confidence, edge, cloud)
    # Reachable offloads: 0, 1 (0.1), 4 (the three 0.2s together), 5, 6.
    assert curve.offloaded.tolist() == [0, 1, 4, 5, 6]
    for threshold, offloaded in zip(curve.thresholds, curve.offloaded, strict=True):
        assert int(np.sum(confidence < threshold)) == offloaded
    # Correct: edge 4; the 0.1 row fixes one; the 0.2 rows fix another; the 0.5 row breaks one.
    assert curve.correct.tolist() == [4, 5, 6, 5, 5]
    assert curve.offloaded[point_for_offload(curve, 0.4)] == 1  # 2.4 rows allowed: 4 would exceed it
    assert curve.offloaded[point_for_offload(curve, 2 / 3)] == 4
    assert curve.offloaded[point_for_offload(curve, 0.0)] == 0
    assert curve.offloaded[point_for_accuracy(curve, 1.0) or 0] == 4
    assert point_for_accuracy(curve, 1.0 + 1e-6) is None


def test_oracle_offloads_the_edge_mistakes_first() -> None:
    edge = np.array([True, False, False, True, True, True])
    cloud = np.array([True, True, False, True, False, True])
    # Fixable rows (edge wrong, cloud right): 1. Harmful (edge right, cloud wrong): 1.
    assert oracle_correct(np.arange(7), edge, cloud).tolist() == [4, 5, 5, 5, 5, 5, 4]


def test_thresholds_are_short_decimals_inside_their_gap() -> None:
    assert threshold_between(0.8, 0.95) == 0.9
    assert threshold_between(0.91234, 0.91301) == 0.9127
    for low, high in [(0.1, 0.1 + 1e-15), (0.0, 1e-300), (0.5, 0.5000001)]:
        assert low < threshold_between(low, high) <= high


# --- model.toml ----------------------------------------------------------------------------------------------------

TOML = """# A comment at the top.
name = "m"

[routing]
# How rows are routed.
output = "scores"
threshold = 0.5   # chosen by hand
cloud_model = "m"

[edge]
artifact = "edge.onnx"
"""


def test_with_routing_values_edits_the_routing_table_in_place() -> None:
    edited = with_routing_values(TOML, {"threshold": 0.918, "temperature": 1.25})
    assert edited == TOML.replace(
        "threshold = 0.5   # chosen by hand\n", "threshold = 0.918   # chosen by hand\ntemperature = 1.25\n"
    )
    again = with_routing_values(edited, {"threshold": 0.7, "temperature": 0.5})
    assert "threshold = 0.7   # chosen by hand\ntemperature = 0.5\n" in again
    assert again.count("temperature") == 1
    # CRLF files stay CRLF; a file without [routing] gets one.
    crlf = TOML.replace("\n", "\r\n")
    assert with_routing_values(crlf, {"threshold": 0.6}) == crlf.replace("threshold = 0.5 ", "threshold = 0.6 ")
    appended = with_routing_values('name = "m"', {"threshold": 0.6})
    assert appended == 'name = "m"\n\n[routing]\nthreshold = 0.6\n'


def test_write_routing_puts_the_original_back_when_the_result_does_not_load(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    original = "# inline routing cannot be edited by line\nrouting = { threshold = 0.5 }\n"
    (folder / "model.toml").write_text(original)
    with pytest.raises(ConfigurationError):
        write_routing(folder, 0.7, 1.0)
    assert (folder / "model.toml").read_text() == original


def test_load_inputs_explains_unusable_files(tmp_path: Path) -> None:
    spec = load_model(DEMO_REPOSITORY / "digits").config.inputs
    np.savez(tmp_path / "wrong.npz", pixels_typo=np.zeros((2, 64)))
    with pytest.raises(CalibrationError, match="needs 'inputs'; it has \\['pixels_typo'\\]"):
        load_inputs(tmp_path / "wrong.npz", spec)
    np.savez(tmp_path / "complex.npz", inputs=np.zeros((2, 64), dtype=np.complex64))
    with pytest.raises(CalibrationError, match="does not cast to FP32"):
        load_inputs(tmp_path / "complex.npz", spec)
    np.savez(tmp_path / "labels.npz", inputs=np.zeros((2, 64), dtype=np.uint8), labels=np.zeros(3, dtype=np.int64))
    with pytest.raises(CalibrationError, match="'labels' must be 2 integer class indices"):
        load_inputs(tmp_path / "labels.npz", spec)
    inputs, labels = load_inputs(DEMO_REPOSITORY / "digits" / "validation.npz", spec)
    assert inputs["pixels"].dtype == np.float32
    assert labels is not None
    assert labels.dtype == np.int64


# --- offload calibrate -------------------------------------------------------------------------------------------


def _args(repository: Path, data: Path, *extra: str, model: str = "digits") -> list[str]:
    return ["calibrate", "--model-repository", str(repository), "--model", model, "--data", str(data), *extra]


def _routing(repository: Path) -> tuple[float, float]:
    routing = RoutedConfig.of(load_model(repository / "digits")).routing
    return routing.threshold, routing.temperature


def _offload_share(repository: Path, pixels: npt.NDArray[np.float32]) -> float:
    """The share of rows the edge would send with the threshold and temperature in the repository's model.toml:
    the bare edge model's max softmax probability (NumPy) below the threshold."""
    routing = tomllib.loads((repository / "digits" / "model.toml").read_text())["routing"]
    scores = reference.onnx_outputs(repository / "digits" / "edge.onnx", {"pixels": pixels})["scores"]
    confidence = reference.max_softmax(scores, routing.get("temperature", 1.0))
    return float(np.mean(confidence < routing["threshold"]))


def test_calibrate_target_offload_lands_near_the_target_on_held_out_data(repository: Path) -> None:
    toml = repository / "digits" / "model.toml"
    before = toml.read_text()
    plot = repository / "curve.png"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "offload.tools.cli",
            *_args(
                repository, repository / "digits" / "validation.npz", "--target-offload", "0.15", "--plot", str(plot)
            ),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "expected offload" in completed.stdout
    assert "95% CI" in completed.stdout
    assert f"saved the plot to {plot}" in completed.stdout

    # On the held-out test split, with the threshold and temperature as written.
    test_pixels, _ = _split("test", repository)
    assert _offload_share(repository, test_pixels) == pytest.approx(0.15, abs=0.03)

    # model.toml: only threshold changed and temperature added; every comment and other line kept.
    after = toml.read_text()
    threshold, temperature = _routing(repository)
    kept = [line for line in before.splitlines() if not line.startswith("threshold =")]
    assert [line for line in after.splitlines() if not line.startswith(("threshold =", "temperature ="))] == kept
    assert f"threshold = {threshold!r}" in after
    assert f"temperature = {temperature!r}" in after
    assert plot.read_bytes()[:8] == PNG_SIGNATURE


def test_calibrate_target_accuracy_takes_the_least_offload_that_reaches_it(
    repository: Path,
    validation: Split,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = repository / "digits" / "validation.npz"
    code = main(_args(repository, data, "--target-accuracy", "0.98", "--no-temperature"))
    assert code == 0, capsys.readouterr().err
    assert "target: routed accuracy 98.0%" in capsys.readouterr().out
    threshold, temperature = _routing(repository)
    assert temperature == RoutedConfig.of(load_model(DEMO_REPOSITORY / "digits")).routing.temperature  # not fitted

    pixels, labels = validation
    edge_scores = reference.edge_scores(pixels)
    cloud_scores = reference.cloud_scores(pixels)
    confidence = reference.max_softmax(edge_scores, temperature)

    def routed_accuracy(at: float) -> float:
        offload = confidence < at
        answers = np.where(offload, cloud_scores.argmax(axis=1), edge_scores.argmax(axis=1))
        return float(np.mean(answers == labels))

    assert routed_accuracy(threshold) >= 0.98
    # Offloading any less (the surest offloaded rows kept on the edge) misses the target.
    assert routed_accuracy(float(confidence[confidence < threshold].max())) < 0.98


def test_calibrate_an_unreachable_accuracy_exits_2_naming_the_best_reachable(
    repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = repository / "digits" / "model.toml"
    before = toml.read_bytes()
    data = repository / "digits" / "validation.npz"
    code = main(_args(repository, data, "--target-accuracy", "1.0"))
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("offload calibrate: no threshold reaches routed accuracy 100.00%")
    assert "the best reachable is" in err
    assert toml.read_bytes() == before

    code = main(_args(repository, data, "--target-offload", "0.1", model="nope"))
    assert code == 2
    assert "no model 'nope'" in capsys.readouterr().err


def test_calibrate_against_a_running_cloud_server_matches_the_local_cloud_model(
    repository: Path, validation: Split, demo_processes: Processes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Inputs without labels: the cloud's answers are the labels.
    pixels, _ = validation
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, inputs=pixels.astype(np.uint8))
    toml = repository / "digits" / "model.toml"
    before = toml.read_bytes()
    common = _args(repository, unlabelled, "--target-offload", "0.2", "--dry-run")

    assert main([*common, "--cloud", demo_processes.cloud.address]) == 0
    remote = capsys.readouterr().out
    assert main(common) == 0
    local = capsys.readouterr().out
    assert "labels: the cloud model's answers" in remote
    assert "cloud-only accuracy  100.00%" in remote
    assert "dry run" in remote
    # The same model answers over OIP as here: the same report, line for line, but for the data's path.
    assert remote == local
    assert toml.read_bytes() == before
