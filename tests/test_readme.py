"""The README's examples work as a new user would run them, and give the right answers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import Processes
from support import reference
from support.reference import assert_rows_answered_as_routed

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\n```\w*\n(.*?)```\n<!-- /{marker} -->", README.read_text(), re.S)
    assert match, f"README.md has no {marker} block"
    return match.group(1)


def test_readme_tritonclient_example_gets_correct_answers_from_the_edge_agent(
    demo_processes: Processes, tmp_path: Path
) -> None:
    script = _block("tritonclient-example").replace("localhost:8001", demo_processes.edge.address)
    # After the example, as it is: keep what it got, to check every row against the bare models.
    answers = tmp_path / "answers.json"
    script += (
        "\nimport json, pathlib\n"
        f"pathlib.Path({str(answers)!r}).write_text(json.dumps({{"
        "'scores': result.as_numpy('scores').tolist(), "
        "'routes': [route.decode() for route in result.as_numpy('offload_route')]}))\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 0, completed.stderr
    accuracy = float(re.search(r"accuracy: ([0-9.]+)", completed.stdout).group(1))  # type: ignore[union-attr]
    assert accuracy >= 0.9
    assert re.search(r"route: (edge|cloud|mixed)", completed.stdout)

    got = json.loads(answers.read_text())
    pixels = reference.demo_split("test")[0][:32]  # the example's rows
    routes: list[str] = got["routes"]
    # The rows the bare edge model is unsure of went to the cloud (or came from its cached answers) ...
    assert [route in reference.FROM_THE_CLOUD for route in routes] == reference.cloud_bound(pixels).tolist()
    # ... and every row is the bare model's answer of where it went, in order.
    assert_rows_answered_as_routed(np.array(got["scores"], dtype=np.float32), routes, pixels)


def test_ci_runs_the_readme_test_command() -> None:
    ci = (README.parent / ".ci" / "run").read_text()
    assert "test-command" in ci
    assert "python -m pytest" in _block("test-command")


def test_readme_in_process_example_runs(demo_processes: Processes) -> None:
    script = _block("inprocess-example").replace("localhost:8101", demo_processes.cloud.address)
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 0, completed.stderr
    match = re.match(r"(edge|cloud|mixed) \[([0-9 ]+)\]", completed.stdout)
    assert match, completed.stdout
    # The example's four rows of zeros: the bare edge model is unsure of them, so the cloud answers.
    pixels = np.zeros((4, 64), dtype=np.float32)
    assert reference.cloud_bound(pixels).all()
    assert match.group(1) == "cloud"
    assert [int(label) for label in match.group(2).split()] == reference.cloud_scores(pixels).argmax(axis=1).tolist()
