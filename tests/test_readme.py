"""The README's example works as a new user would run it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import Processes

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\n```\w*\n(.*?)```\n<!-- /{marker} -->", README.read_text(), re.S)
    assert match, f"README.md has no {marker} block"
    return match.group(1)


def test_readme_tritonclient_example_gets_correct_answers_from_the_edge_agent(demo_processes: Processes) -> None:
    script = _block("tritonclient-example").replace("localhost:8001", demo_processes.edge.address)
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 0, completed.stderr
    accuracy = float(re.search(r"accuracy: ([0-9.]+)", completed.stdout).group(1))  # type: ignore[union-attr]
    assert accuracy >= 0.9
    assert re.search(r"route: (edge|cloud|mixed)", completed.stdout)


def test_ci_runs_the_readme_test_command() -> None:
    ci = (README.parent / ".ci" / "run").read_text()
    assert "test-command" in ci
    assert "python -m pytest" in _block("test-command")


def test_readme_in_process_example_runs(demo_processes: Processes) -> None:
    script = _block("inprocess-example").replace("localhost:8101", demo_processes.cloud.address)
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 0, completed.stderr
    assert re.match(r"(edge|cloud|mixed) \[", completed.stdout)
