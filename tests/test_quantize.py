"""`offload quantize`: 8-bit edge models from onnxruntime.quantization, written as new model versions.

The quantized files are checked with bare ONNX Runtime sessions and onnx's graph (reference.onnx_outputs),
the recalibrated thresholds with a NumPy softmax (reference.max_softmax), and the written model.toml with
tomllib and line by line against the original.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import pytest

from conftest import Processes
from offload.edge.agent import load_edge_models
from offload.models import BENCHMARK_REPOSITORY, DEMO_REPOSITORY
from offload.oip.errors import ConfigurationError
from offload.tools.calibrate import with_table_values
from offload.tools.cli import main
from offload.tools.quantize import bump_version
from support import reference

# Quantized and float models must give the same class on at least this share of the test rows.
AGREEMENT_FLOOR = 0.95


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """A copy of the demo repository that quantize may rewrite."""
    return Path(shutil.copytree(DEMO_REPOSITORY, tmp_path / "repository"))


def _quantize(repository: Path, *extra: str, model: str = "digits") -> list[str]:
    data = repository / model / "validation.npz"
    return ["quantize", "--model-repository", str(repository), "--model", model, "--data", str(data), *extra]


def _ops(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def _routing(folder: Path) -> dict[str, Any]:
    routing: dict[str, Any] = tomllib.loads((folder / "model.toml").read_text())["routing"]
    return routing


def _offload_shares(scores: npt.NDArray[Any], threshold: float, temperature: float) -> tuple[int, int]:
    """Rows below the threshold, and rows below the next distinct confidence above it (the next larger offload)."""
    confidence = reference.max_softmax(scores, temperature)
    above = confidence[confidence >= threshold]
    next_offload = int(np.count_nonzero(confidence <= above.min())) if above.size else confidence.size + 1
    return int(np.count_nonzero(confidence < threshold)), next_offload


def _row_by_row(path: Path, pixels: npt.NDArray[np.float32]) -> npt.NDArray[Any]:
    """The model's scores for each row run alone, as a one-row request gets them: dynamic quantization scales
    activations by the batch's range, so in a batch a row's scores depend on the rows beside it."""
    return np.concatenate(
        [reference.onnx_outputs(path, {"pixels": pixels[row : row + 1]})["scores"] for row in range(len(pixels))]
    )


def _assert_same_tensors(quantized: Path, original: Path) -> None:
    def tensors(path: Path) -> list[tuple[str, int, list[Any]]]:
        graph = onnx.load(str(path)).graph
        return [
            (
                value.name,
                value.type.tensor_type.elem_type,
                [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim],
            )
            for value in [*graph.input, *graph.output]
        ]

    assert tensors(quantized) == tensors(original)


def test_dynamic_in_place_writes_a_new_version_that_the_edge_loads(
    repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = repository / "digits"
    toml = folder / "model.toml"
    before = toml.read_text()
    float_file = (folder / "edge.onnx").read_bytes()
    old_threshold = _routing(folder)["threshold"]
    code = main([*_quantize(repository, "--test-data", str(folder / "test.npz"), "--latency-runs", "3")])
    out, err = capsys.readouterr()
    assert code == 0, err
    for line in ("file size", "latency p50, batch 1 ", "latency p50, batch 64 ", "routed accuracy", "offload"):
        assert line in out
    assert "held out" in out

    # A valid 8-bit model: dynamic quantization's integer kernels, the float model's tensors, the edge loads it.
    quantized = folder / "edge_int8.onnx"
    onnx.checker.check_model(onnx.load(str(quantized)), full_check=True)
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= _ops(quantized)
    assert quantized.stat().st_size < 0.6 * len(float_file)
    _assert_same_tensors(quantized, folder / "edge.onnx")
    routed = load_edge_models(repository)["digits"]
    assert routed.version == "2"
    assert [spec.name for spec in routed.edge.inputs] == ["pixels"]
    assert [spec.name for spec in routed.edge.outputs] == ["scores"]
    assert (folder / "edge.onnx").read_bytes() == float_file  # the old version's file is kept

    # It answers like the float model on most held-out rows.
    pixels, labels = reference.demo_split("test")
    float_scores = reference.edge_scores(pixels)
    scores = _row_by_row(quantized, pixels)
    assert np.mean(scores.argmax(axis=1) == float_scores.argmax(axis=1)) >= AGREEMENT_FLOOR
    assert np.mean(scores.argmax(axis=1) == labels) >= 0.95

    # model.toml: version bumped, the artifact switched, the threshold recalibrated; every other line and
    # comment kept in order, the new version's note on top.
    after = toml.read_text()
    routing = _routing(folder)
    changed = ('version = "', 'artifact = "', "threshold = ")
    kept = [line for line in before.splitlines() if not line.startswith(changed)]
    new_lines = after.splitlines()
    notes = [line for line in new_lines if line.startswith("# ") and line not in before]
    assert "offload quantize" in " ".join(notes)
    assert [line for line in new_lines if not line.startswith(changed) and line not in notes] == kept
    assert 'version = "2"' in new_lines
    assert 'artifact = "edge_int8.onnx"' in new_lines
    assert f"threshold = {routing['threshold']!r}" in new_lines
    assert "temperature" not in routing  # kept as configured

    # The recalibrated threshold offloads the largest share of validation rows not above what the old one
    # offloaded with the float model.
    validation, _ = reference.demo_split("validation")
    float_offloaded = int(
        np.count_nonzero(reference.max_softmax(reference.edge_scores(validation), 1.0) < old_threshold)
    )
    offloaded, next_offload = _offload_shares(_row_by_row(quantized, validation), routing["threshold"], 1.0)
    assert offloaded <= float_offloaded < next_offload

    # Quantizing again in place: the edge model is 8-bit already.
    written = toml.read_bytes()
    assert main(_quantize(repository, "--latency-runs", "0")) == 2
    assert "quantized already" in capsys.readouterr().err
    assert toml.read_bytes() == written


def test_static_into_another_repository_makes_a_new_folder_and_leaves_the_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The benchmark's CNN: static QDQ quantization of its convolutions, a new name in another repository.
    source = Path(shutil.copytree(BENCHMARK_REPOSITORY, tmp_path / "source"))
    target = tmp_path / "target"
    target.mkdir()
    folder = source / "digits_cnn"
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    args = _quantize(source, model="digits_cnn")
    extra = ["--mode", "static", "--calibration-data", str(folder / "validation.npz"), "--per-channel"]
    extra += ["--out-repository", str(target), "--name", "digits_cnn_int8", "--target-offload", "0.1"]
    code = main([*args, *extra, "--latency-runs", "2", "--latency-batch", "8"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "static: QDQ, int8 weights per channel" in out
    assert f"activation ranges from 269 rows of {folder / 'validation.npz'}" in out
    assert f"wrote {target / 'digits_cnn_int8'} (a new folder)" in out
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before  # the source is untouched

    new = target / "digits_cnn_int8"
    quantized = new / "edge_int8.onnx"
    assert sorted(path.name for path in new.iterdir()) == sorted(
        ["cloud.pt2", "edge_int8.onnx", "model.toml", "test.npz", "validation.npz"]
    )  # the float edge.onnx is the old version's, left out
    ops = _ops(quantized)
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert quantized.stat().st_size < 0.3 * (folder / "edge.onnx").stat().st_size
    _assert_same_tensors(quantized, folder / "edge.onnx")
    config = tomllib.loads((new / "model.toml").read_text())
    assert (config["name"], config["version"], config["edge"]["artifact"]) == ("digits_cnn_int8", "2", "edge_int8.onnx")
    assert load_edge_models(target)["digits_cnn_int8"].version == "2"

    pixels, _ = reference.demo_split("test")  # the CNN's splits are the demo's
    float_scores = reference.onnx_outputs(folder / "edge.onnx", {"pixels": pixels})["scores"]
    scores = _row_by_row(quantized, pixels)
    assert np.mean(scores.argmax(axis=1) == float_scores.argmax(axis=1)) >= AGREEMENT_FLOOR

    validation, _ = reference.demo_split("validation")
    offloaded, next_offload = _offload_shares(_row_by_row(quantized, validation), config["routing"]["threshold"], 1.0)
    assert offloaded <= 0.1 * len(validation) < next_offload


def test_the_cloud_answers_from_a_running_server_match_the_local_cloud_model(
    repository: Path, tmp_path: Path, demo_processes: Processes, capsys: pytest.CaptureFixture[str]
) -> None:
    reports = {}
    for name, cloud in (("local", []), ("remote", ["--cloud", demo_processes.cloud.address])):
        out = tmp_path / name
        out.mkdir()
        args = ["--latency-runs", "0", "--out-repository", str(out), "--name", "digits_int8", *cloud]
        assert main([*_quantize(repository), *args]) == 0
        reports[name] = capsys.readouterr().out.splitlines()
        assert reports[name][-1].startswith(f"wrote {out / 'digits_int8'} (a new folder)")
    # The same model answers over OIP as here: the same figures and threshold, line for line.
    assert reports["remote"][:-1] == reports["local"][:-1]
    assert _routing(tmp_path / "remote" / "digits_int8") == _routing(tmp_path / "local" / "digits_int8")


def test_bad_inputs_exit_2_with_the_reason_and_write_nothing(
    repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = repository / "digits"
    snapshot = {path.name: path.read_bytes() for path in folder.iterdir()}
    wrong_names = tmp_path / "wrong.npz"
    np.savez(wrong_names, pictures=np.zeros((4, 64), dtype=np.float32))
    not_npz = tmp_path / "not.npz"
    not_npz.write_text("pixels")
    wrong_width = tmp_path / "width.npz"
    np.savez(wrong_width, inputs=np.zeros((4, 63), dtype=np.float32))
    static = ["--mode", "static", "--calibration-data"]
    cases = [
        (["--mode", "static"], "--mode static needs --calibration-data FILE.npz"),
        ([*static, str(wrong_names)], f"{wrong_names}: needs 'inputs'; it has ['pictures']"),
        ([*static, str(not_npz)], f"{not_npz}: cannot read it as an .npz file"),
        ([*static, str(tmp_path / "missing.npz")], "cannot read it as an .npz file"),
        ([*static, str(wrong_width)], f"{wrong_width}: input 'pixels' has rows of shape [63]; the model takes [64]"),
        (["--calibration-data", str(folder / "validation.npz")], "--calibration-data: only --mode static uses it"),
        (["--format", "qoperator", "--activation-type", "uint8"], "--format, --activation-type: only --mode static"),
        (["--new-version", "1"], "--new-version '1' is the model's current version"),
        (["--op-types", "Softmax"], "no operator of the op types ['Softmax']"),
        (["--name", "digits", "--out-repository", str(tmp_path / "nowhere")], "is not a folder"),
    ]
    for extra, message in cases:
        assert main([*_quantize(repository, "--latency-runs", "0"), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("offload quantize: "), err
        assert message in err, (extra, err)
        assert {path.name: path.read_bytes() for path in folder.iterdir()} == snapshot
    args = ["quantize", "--model-repository", str(repository), "--model", "digits", "--data", str(wrong_names)]
    assert main(args) == 2
    assert f"{wrong_names}: needs 'inputs'" in capsys.readouterr().err
    assert main([*_quantize(repository), "--model", "nope"]) == 2
    assert "no model 'nope' with an [edge] section" in capsys.readouterr().err


def test_a_new_version_that_does_not_load_is_removed(repository: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Another folder of the target repository already answers to the new name: the repository would not load.
    clash = repository / "clash"
    clash.mkdir()
    (clash / "model.toml").write_text('name = "digits_int8"\n')
    code = main([*_quantize(repository, "--latency-runs", "0"), "--name", "digits_int8"])
    assert code == 2
    assert "model name 'digits_int8' is used by two folders" in capsys.readouterr().err
    assert not (repository / "digits_int8").exists()
    assert not (repository / "digits" / "edge_int8.onnx").exists()


def test_bump_version() -> None:
    assert [bump_version(version) for version in ("1", "9", "v1.9", "007", "2024.01")] == [
        "2",
        "10",
        "v1.10",
        "008",
        "2024.02",
    ]
    with pytest.raises(ConfigurationError, match="pass --new-version"):
        bump_version("beta")


def test_with_table_values_edits_top_level_keys_and_any_table_keeping_the_rest() -> None:
    text = (
        '# top\nname = "m"  # the name\nversion = "1 beta"   # a version # with hashes\n\n[edge]\nartifact = "a.onnx"\n'
    )
    edited = with_table_values(with_table_values(text, None, {"version": "2"}), "edge", {"artifact": "b.onnx"})
    assert edited == text.replace('"1 beta"', '"2"').replace('"a.onnx"', '"b.onnx"')
    assert tomllib.loads(edited) == {"name": "m", "version": "2", "edge": {"artifact": "b.onnx"}}
    # A missing top-level key goes after the last one, before the first table; CRLF stays CRLF.
    crlf = text.replace("\n", "\r\n")
    added = with_table_values(crlf, None, {"description": 'say "hi"'})
    assert '# a version # with hashes\r\ndescription = "say \\"hi\\""\r\n\r\n[edge]' in added
    assert tomllib.loads(added)["description"] == 'say "hi"'
