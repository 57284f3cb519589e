"""Static checks of the deployment files (no container engine or cluster runs in CI): the images, the
Kubernetes and KServe manifests against the Kubernetes schemas, the compose file, the systemd unit, and that
every setting and flag they use exists."""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from yamllint import linter
from yamllint.config import YamlLintConfig

from conftest import Processes
from offload.cloud.settings import CloudSettings
from offload.edge.settings import EdgeSettings
from offload.tools.cli import build_parser
from support.deployfiles import (
    DEPLOY,
    FOREIGN_VARIABLES,
    PENDING_SETTINGS,
    ROOT,
    SETTINGS,
    Document,
    Workload,
    by_kind,
    compose_services,
    dockerfile_instructions,
    dockerfile_user,
    image_of,
    kubernetes_documents,
    systemd_unit,
    workloads,
    yaml_documents,
)

# The oldest Kubernetes the manifests are written for (native gRPC probes, PDB unhealthyPodEvictionPolicy),
# and the newest whose schemas kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())
# InferenceService predictor fields that KServe adds to a PodSpec (ComponentExtensionSpec).
KSERVE_EXTENSION_FIELDS = frozenset(
    {
        "minReplicas",
        "maxReplicas",
        "scaleTarget",
        "scaleMetric",
        "scaleMetricType",
        "autoScaling",
        "containerConcurrency",
        "timeout",
        "canaryTrafficPercent",
        "logger",
        "batcher",
        "labels",
        "annotations",
        "deploymentStrategy",
    }
)
WORKLOADS = list(workloads())


# --- images ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("image", "extra"), [("edge", "edge"), ("cloud", "cloud")])
def test_image_installs_its_extra_copies_what_exists_and_runs_as_a_numeric_non_root_user(
    image: str, extra: str
) -> None:
    instructions = dockerfile_instructions(image)
    runs = " ".join(args for op, args in instructions if op == "RUN")
    assert f"'.[{extra}]'" in runs
    copied = {source for op, args in instructions if op == "COPY" for source in args.split()[:-1]}
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: no such path"
    # `pip install .` builds the wheel from every wing folder: a folder left out breaks the image build.
    wing_folders = {
        package.split("/")[0] for package in _pyproject()["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    }
    assert wing_folders <= copied, f"the image does not copy {sorted(wing_folders - copied)}"
    assert ("STOPSIGNAL", "SIGTERM") in instructions
    # Numeric, so that Kubernetes' runAsNonRoot can check the image; created by the RUN above.
    uid = dockerfile_user(image)
    assert uid > 0
    assert f"--uid {uid}" in runs


def test_edge_image_never_installs_torch() -> None:
    instructions = dockerfile_instructions("edge")
    assert not any("torch" in args for op, args in instructions if op in ("FROM", "RUN"))
    project = _pyproject()["project"]
    assert not any(
        "torch" in dependency for dependency in [*project["dependencies"], *project["optional-dependencies"]["edge"]]
    )


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- settings and flags, in every file --------------------------------------------------------------------------


def test_every_deployment_file_is_read_for_workloads() -> None:
    where = {workload.where.split()[0].split("/")[0] for workload in WORKLOADS}
    assert where == {"docker", "kubernetes", "kserve", "compose", "systemd"}


@pytest.mark.parametrize("workload", WORKLOADS, ids=[workload.where for workload in WORKLOADS])
def test_workload_runs_a_real_command_with_real_settings(workload: Workload) -> None:
    assert Path(workload.argv[0]).name == "offload", workload.argv
    try:
        build_parser().parse_args(workload.argv[1:])
    except SystemExit:
        pytest.fail(f"{workload.where}: `{' '.join(workload.argv)}` is not a valid offload command line")
    cls = SETTINGS[workload.command]
    prefix = str(cls.model_config.get("env_prefix", ""))
    for name in workload.env:
        if name.startswith(prefix):
            setting = name.removeprefix(prefix).lower()
            assert setting in cls.model_fields or setting in PENDING_SETTINGS, (
                f"{workload.where}: {name} is not a setting"
            )
        else:
            assert not name.startswith("OFFLOAD_"), f"{workload.where}: {name} is for the other component"
            assert name in FOREIGN_VARIABLES, f"{workload.where}: {name} is neither a setting nor a known variable"
    workload.settings()  # the values validate too (a port is a number in range, a duration one >= 0, ...)


def test_settings_and_command_lines_in_the_docs_and_comments_exist() -> None:
    for path in [ROOT / "README.md", *sorted(path for path in DEPLOY.rglob("*") if path.is_file())]:
        text = path.read_text()
        for component, name, family in re.findall(r"\bOFFLOAD_(EDGE|CLOUD)_([A-Z_]+)(\*?)", text):
            known = {*SETTINGS[component.lower()].model_fields, *PENDING_SETTINGS}
            # OFFLOAD_CLOUD_TLS_* names a family of settings.
            matches = [s for s in known if s.startswith(name.lower())] if family else [name.lower()]
            assert set(matches) & known, (
                f"{path.relative_to(ROOT)}: OFFLOAD_{component}_{name}{family} is not a setting"
            )
        # Shell continuation lines (`\` at the end) are one command.
        joined = re.sub(r"\\\n\s*", " ", text)
        for line in re.findall(r"\boffload (?:edge|cloud) --[^`\n]*", joined):
            if "[" in line:  # a synopsis: `offload edge [--grpc-port 8001] ...`
                continue
            argv = shlex.split(line.split("&&")[0], comments=True)
            try:
                build_parser().parse_args(argv[1:])
            except SystemExit:
                pytest.fail(f"{path.relative_to(ROOT)}: `{line}` is not a valid offload command line")


def test_pending_settings_are_not_settings_yet() -> None:
    # When the TLS or metrics work lands, its settings become real: take them out of PENDING_SETTINGS so that
    # the checks above hold them to the real model.
    for cls in (EdgeSettings, CloudSettings):
        arrived = PENDING_SETTINGS & set(cls.model_fields)
        assert not arrived, f"{sorted(arrived)} are real {cls.__name__} fields now: remove them from PENDING_SETTINGS"


# --- health checks ------------------------------------------------------------------------------------------------


def _health_commands() -> list[tuple[str, str, str]]:
    """(where, component, the Python one-liner) of every health check in the images and the compose file."""
    commands = []
    for image in SETTINGS:
        healthcheck = next(args for op, args in dockerfile_instructions(image) if op == "HEALTHCHECK")
        argv = shlex.split(healthcheck.split(" CMD ", 1)[1])
        commands.append((f"docker/{image}.Dockerfile", image, _python_command(argv)))
    for name, service in compose_services().items():
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD", f"compose {name}: exec form, no shell"
        commands.append((f"compose {name}", image_of(service["image"]), _python_command(test[1:])))
    return commands


def _python_command(argv: list[str]) -> str:
    assert argv[:2] == ["python", "-c"], argv
    return argv[2]


def test_health_checks_ask_their_own_server_for_the_overall_service() -> None:
    for where, _, command in _health_commands():
        (workload,) = (w for w in WORKLOADS if w.where == where)
        # The plaintext health port: it answers whether or not TLS and tokens guard the gRPC port.
        health_port = workload.settings().health_port
        assert health_port is not None, f"{where}: no health port"
        assert f"'127.0.0.1:{health_port}'" in command, f"{where}: the health check asks another port"
        assert "HealthCheckRequest()" in command, f"{where}: the health check asks for the overall service ''"


def test_health_checks_pass_against_a_real_server_and_fail_without_one(demo_processes: Processes) -> None:
    addresses = {"edge": demo_processes.edge.address, "cloud": demo_processes.cloud.address}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"
    # The same one-liner in several files is run once per server.
    checks = {(component, _with_address(command, addresses[component])) for _, component, command in _health_commands()}
    for component, command in sorted(checks):
        serving = subprocess.run(
            [sys.executable, "-c", command], capture_output=True, text=True, timeout=30, check=False
        )
        assert serving.returncode == 0, f"{component}: {serving.stderr}"
    _, command = min(checks)
    down = subprocess.run(
        [sys.executable, "-c", _with_address(command, closed)], capture_output=True, timeout=30, check=False
    )
    assert down.returncode != 0


def _with_address(command: str, address: str) -> str:
    start = command.index("'127.0.0.1:")
    return command[:start] + f"'{address}'" + command[command.index("'", start + 1) + 1 :]


# --- Kubernetes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_match_the_kubernetes_schemas(version: str) -> None:
    for document in kubernetes_documents():
        _validate(document, version)
    # KServe's InferenceService has no schema here: its predictor is a PodSpec plus KServe's own fields, so
    # the PodSpec part is validated as a Pod and the rest must be KServe fields.
    for document in yaml_documents(DEPLOY / "kserve" / "inference-service.yaml"):
        predictor = document["spec"]["predictor"]
        pod_spec = {key: value for key, value in predictor.items() if key not in KSERVE_EXTENSION_FIELDS}
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": document["metadata"], "spec": pod_spec}
        _validate(pod, version)


def _validate(document: Document, version: str) -> None:
    name = f"{document['kind']}/{document['metadata']['name']}"
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{name} (Kubernetes {version}): {'.'.join(map(str, exc.path))}: {exc.message}")


def _cloud_pool() -> tuple[dict[str, Document], Document, Document, Workload]:
    kinds = by_kind(kubernetes_documents())
    assert set(kinds) == {
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
    pod = kinds["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    (workload,) = (w for w in WORKLOADS if w.where.startswith("kubernetes"))
    assert workload.command == "cloud"
    return kinds, pod, container, workload


def _ports(container: Document) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container["ports"]}


def test_kubernetes_probes_grpc_health_and_drains_within_its_grace_period() -> None:
    _, pod, container, workload = _cloud_pool()
    settings = workload.settings()
    assert _ports(container)["grpc"] == settings.grpc_port
    # The kubelet's gRPC probes speak plaintext without a client certificate: they ask the health port, since
    # the gRPC port serves (mutual) TLS only.
    assert settings.tls_cert is not None
    assert settings.health_port is not None
    assert _ports(container)["health"] == settings.health_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": settings.health_port, "service": ""}, probe
    # The server binds its port only after loading: the startup probe covers that, not the liveness probe.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    assert pod["spec"]["terminationGracePeriodSeconds"] > settings.grace_seconds
    # Service links would set OFFLOAD_CLOUD_<SERVICE>_PORT=tcp://... for Services named offload-cloud-*.
    assert pod["spec"]["enableServiceLinks"] is False


def test_kubernetes_pod_runs_unprivileged_on_a_read_only_root() -> None:
    _, pod, container, workload = _cloud_pool()
    pod_security = pod["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == dockerfile_user(image_of(container["image"]))
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert pod["spec"]["automountServiceAccountToken"] is False
    # What must stay writable is a volume: /tmp, and $HOME for libraries' caches.
    writable = {mount["mountPath"] for mount in container["volumeMounts"] if not mount.get("readOnly")}
    assert "/tmp" in writable
    assert any(Path(workload.env["HOME"]).is_relative_to(path) for path in writable)


def test_kubernetes_pod_requests_a_gpu_and_bounds_its_memory() -> None:
    _, _, container, workload = _cloud_pool()
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] >= 1
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]
    assert workload.env["OFFLOAD_CLOUD_DEVICE"] == "cuda"


def test_kubernetes_pod_reads_models_from_a_claim_and_tls_files_from_a_secret() -> None:
    kinds, pod, container, workload = _cloud_pool()
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    models = mounts[str(workload.settings().model_repository)]
    assert models["readOnly"] is True
    claim = volumes[models["name"]]["persistentVolumeClaim"]
    assert claim["claimName"] == kinds["PersistentVolumeClaim"]["metadata"]["name"]
    tls = mounts["/etc/offload/tls"]
    assert tls["readOnly"] is True
    assert "secretName" in volumes[tls["name"]]["secret"]
    for name in ("OFFLOAD_CLOUD_TLS_CERT", "OFFLOAD_CLOUD_TLS_KEY", "OFFLOAD_CLOUD_TLS_CLIENT_CA"):
        assert Path(workload.env[name]).parent == Path("/etc/offload/tls"), name


def test_kubernetes_pod_is_scraped_on_its_metrics_port() -> None:
    _, pod, container, workload = _cloud_pool()
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert (
        annotations["prometheus.io/port"]
        == str(_ports(container)["metrics"])
        == workload.env["OFFLOAD_CLOUD_METRICS_PORT"]
    )


def test_kubernetes_headless_service_autoscaler_and_disruption_budget_select_the_pool() -> None:
    kinds, pod, container, _ = _cloud_pool()
    deployment = kinds["Deployment"]
    labels = deployment["spec"]["selector"]["matchLabels"]
    assert labels.items() <= pod["metadata"]["labels"].items()
    service = kinds["Service"]["spec"]
    # Headless: the DNS name resolves to every ready pod, for the edge agents' client-side balancing.
    assert service["clusterIP"] == "None"
    assert service["selector"] == labels
    (port,) = service["ports"]
    assert port["targetPort"] == "grpc"
    assert port["port"] == _ports(container)["grpc"]
    hpa = kinds["HorizontalPodAutoscaler"]["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    budget = kinds["PodDisruptionBudget"]["spec"]
    assert budget["selector"]["matchLabels"] == labels
    # A node drain never takes the pool below one serving replica.
    assert hpa["minReplicas"] > budget["maxUnavailable"] >= 1


def test_kserve_runs_the_cloud_as_a_custom_predictor_with_grpc_on_an_h2c_port() -> None:
    (document,) = yaml_documents(DEPLOY / "kserve" / "inference-service.yaml")
    assert (document["apiVersion"], document["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    (container,) = document["spec"]["predictor"]["containers"]
    # KServe reads STORAGE_URI from the container with this name and downloads it to /mnt/models.
    assert container["name"] == "kserve-container"
    (workload,) = (w for w in WORKLOADS if w.where.startswith("kserve"))
    settings = workload.settings()
    assert workload.command == "cloud"
    assert "STORAGE_URI" in workload.env
    assert settings.model_repository == Path("/mnt/models")
    assert container["ports"] == [{"name": "h2c", "containerPort": settings.grpc_port, "protocol": "TCP"}]
    assert container["readinessProbe"]["grpc"] == {"port": settings.grpc_port, "service": ""}
    assert container["livenessProbe"]["grpc"]["port"] == settings.grpc_port
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert document["spec"]["predictor"]["enableServiceLinks"] is False


def test_yaml_files_pass_yamllint() -> None:
    config = YamlLintConfig(file=str(ROOT / ".yamllint.yaml"))
    files = [*sorted(DEPLOY.rglob("*.yaml")), ROOT / ".yamllint.yaml"]
    assert len(files) >= 4
    problems = [
        f"{path.relative_to(ROOT)}:{problem.line}:{problem.column}: {problem.desc} ({problem.rule})"
        for path in files
        for problem in linter.run(path.read_text(), config, str(path))
    ]
    assert not problems, "\n".join(problems)


# --- compose --------------------------------------------------------------------------------------------------


def test_compose_runs_one_cloud_and_two_edge_agents_pointing_at_it() -> None:
    services = compose_services()
    components = {name: image_of(service["image"]) for name, service in services.items()}
    assert sorted(components.values()) == ["cloud", "edge", "edge"]
    (cloud,) = (name for name, component in components.items() if component == "cloud")
    settings = {w.where.removeprefix("compose "): w.settings() for w in WORKLOADS if w.where.startswith("compose")}
    published = []
    for name, service in services.items():
        component = components[name]
        build = service["build"]
        assert (DEPLOY / build["context"]).resolve() == ROOT
        assert build["dockerfile"] == f"deploy/docker/{component}.Dockerfile"
        assert set(service["healthcheck"]) >= {"test", "interval", "timeout", "retries", "start_period"}
        assert _seconds(service["stop_grace_period"]) > settings[name].grace_seconds
        assert service["read_only"] is True
        assert service["cap_drop"] == ["ALL"]
        for mapping in service["ports"]:
            host, container_port = mapping.split(":")
            assert int(container_port) == settings[name].grpc_port
            published.append(host)
        if component == "edge":
            assert service["depends_on"] == {cloud: {"condition": "service_healthy"}}
            edge_settings = settings[name]
            assert isinstance(edge_settings, EdgeSettings)
            assert edge_settings.cloud == f"{cloud}:{settings[cloud].grpc_port}"
    assert len(published) == len(set(published)), "two services publish the same host port"


def _seconds(duration: str) -> float:
    assert duration.endswith("s"), duration
    return float(duration.removesuffix("s"))


# --- systemd --------------------------------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "offload-edge.service"


def test_systemd_unit_is_hardened_and_drains_within_its_stop_timeout() -> None:
    unit = systemd_unit(UNIT)
    service = {key: values[-1] for key, values in unit["Service"].items()}
    (workload,) = (w for w in WORKLOADS if w.where.startswith("systemd"))
    assert workload.argv[1:] == ["edge", "--config", "/etc/offload/edge.toml"]
    assert service["EnvironmentFile"] == "-/etc/offload/edge.env"
    assert service["DynamicUser"] == "yes" or service.get("User", "root") != "root"
    assert service["StateDirectory"]
    expected = {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
    }
    assert {key: service.get(key) for key in expected} == expected
    assert set(service["RestrictAddressFamilies"].split()) <= {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert service["MemoryMax"].endswith(("K", "M", "G"))
    assert service["RestartSec"]
    assert int(service["TimeoutStopSec"]) > workload.settings().grace_seconds


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_unit_and_rates_it_well_hardened(tmp_path: Path) -> None:
    # verify also checks that ExecStart's program exists: point it at this environment's `offload`.
    offload = Path(sys.executable).with_name("offload")
    assert offload.exists()
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/offload/venv/bin/offload", str(offload)))
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    # Unknown keys and bad values are only warnings (exit status 0): any line about the unit fails the test.
    assert verify.returncode == 0, verify.stderr
    assert str(unit) not in verify.stderr + verify.stdout, verify.stderr
    # The exposure score (0-10, lower is better); the threshold is in tenths.
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=15", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "--offline" in security.stderr:
        pytest.skip("this systemd-analyze has no offline security review (systemd < 250)")
    assert security.returncode == 0, security.stdout[-500:]
