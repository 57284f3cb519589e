"""Static checks of the deployment files (no container engine or cluster runs in CI)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from offload.cloud.settings import CloudSettings
from offload.edge.settings import EdgeSettings
from offload.tools.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ROOT = DEPLOY.parent


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def _env_names(instructions: list[tuple[str, str]]) -> set[str]:
    return {pair.split("=", 1)[0] for op, args in instructions if op == "ENV" for pair in shlex.split(args)}


@pytest.mark.parametrize(
    ("image", "extra", "settings"), [("edge", "edge", EdgeSettings), ("cloud", "cloud", CloudSettings)]
)
def test_image_installs_its_extra_copies_what_exists_and_sets_only_known_settings(
    image: str, extra: str, settings: type[EdgeSettings] | type[CloudSettings]
) -> None:
    instructions = _instructions(DEPLOY / "docker" / f"{image}.Dockerfile")
    runs = " ".join(args for op, args in instructions if op == "RUN")
    assert f"'.[{extra}]'" in runs
    copied = {source for op, args in instructions if op == "COPY" for source in args.split()[:-1]}
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: no such path"
    # `pip install .` builds the wheel from every wing folder: a folder left out breaks the image build.
    wing_folders = {package.split("/")[0] for package in _wheel_packages()}
    assert wing_folders <= copied, f"the image does not copy {sorted(wing_folders - copied)}"
    prefix = settings.model_config.get("env_prefix", "")
    for name in _env_names(instructions):
        assert name.startswith(prefix)
        assert name.removeprefix(prefix).lower() in settings.model_fields, f"{name} is not a setting"
    entrypoint = next(args for op, args in instructions if op == "ENTRYPOINT")
    assert yaml.safe_load(entrypoint) == ["offload", image]
    assert ("STOPSIGNAL", "SIGTERM") in instructions
    assert any(op == "USER" and args != "root" for op, args in instructions), "images run as a non-root user"


def test_edge_image_never_installs_torch() -> None:
    instructions = _instructions(DEPLOY / "docker" / "edge.Dockerfile")
    assert not any("torch" in args for op, args in instructions if op in ("FROM", "RUN"))
    assert not any("torch" in dependency for dependency in _edge_extra())


def _wheel_packages() -> list[str]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages: list[str] = project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    return packages


def _edge_extra() -> list[str]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]) + list(project["optional-dependencies"]["edge"])


def test_systemd_unit_runs_a_real_command_with_a_stop_timeout_above_the_grace_period() -> None:
    unit = (DEPLOY / "systemd" / "offload-edge.service").read_text()
    exec_start = re.search(r"^ExecStart=(.+)$", unit, re.M)
    assert exec_start is not None
    argv = shlex.split(exec_start.group(1))
    assert argv[0].endswith("/offload")
    build_parser().parse_args(argv[1:])  # exits (fails the test) on an unknown flag
    stop = re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M)
    assert stop is not None
    assert int(stop.group(1)) > EdgeSettings.model_fields["grace_seconds"].default
    assert re.search(r"^KillSignal=SIGTERM$", unit, re.M)


def test_kubernetes_manifest_probes_grpc_health_and_drains_within_its_grace_period() -> None:
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "cloud.yaml").read_text()))
    kinds = {document["kind"]: document for document in documents}
    assert set(kinds) == {"Deployment", "Service"}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    port = container["ports"][0]["containerPort"]
    assert container["readinessProbe"]["grpc"]["port"] == port
    assert container["livenessProbe"]["grpc"]["port"] == port
    assert pod["terminationGracePeriodSeconds"] > CloudSettings.model_fields["grace_seconds"].default
    for variable in container["env"]:
        assert variable["name"].removeprefix("OFFLOAD_CLOUD_").lower() in CloudSettings.model_fields
    service = kinds["Service"]["spec"]
    assert service["selector"] == kinds["Deployment"]["spec"]["selector"]["matchLabels"]
    assert service["ports"][0]["targetPort"] == container["ports"][0]["name"]
