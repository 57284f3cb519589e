"""Reading the deployment files under deploy/: Dockerfile instructions, YAML documents, systemd units, and
the workloads they start (the `offload` command line and the environment each process gets)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from offload.cloud.settings import CloudSettings
from offload.edge.settings import EdgeSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SETTINGS: dict[str, type[EdgeSettings] | type[CloudSettings]] = {"edge": EdgeSettings, "cloud": CloudSettings}
# Settings the deployment files already set that arrive with work in progress (none now). Each must leave
# this list once it is a real setting.
PENDING_SETTINGS: frozenset[str] = frozenset()
# Variables set next to the settings that something else in the container reads.
FOREIGN_VARIABLES = {"HOME": "libraries' caches (torch, CUDA)", "STORAGE_URI": "KServe's storage initializer"}

Document = dict[str, Any]


def dockerfile_instructions(image: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/docker/<image>.Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "docker" / f"{image}.Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def dockerfile_env(image: str) -> dict[str, str]:
    pairs = [pair for op, args in dockerfile_instructions(image) if op == "ENV" for pair in shlex.split(args)]
    return dict(pair.split("=", 1) for pair in pairs)


def dockerfile_entrypoint(image: str) -> list[str]:
    entrypoint: list[str] = yaml.safe_load(next(a for op, a in dockerfile_instructions(image) if op == "ENTRYPOINT"))
    return entrypoint


def dockerfile_user(image: str) -> int:
    """The numeric uid the image runs as."""
    user = next(args for op, args in dockerfile_instructions(image) if op == "USER")
    return int(user.split(":")[0])


def image_of(reference: str) -> str:
    """'edge' or 'cloud' for an image reference such as registry/offload-cloud:0.1.0."""
    name = reference.rsplit("/", 1)[-1].split(":", maxsplit=1)[0]
    assert name in ("offload-edge", "offload-cloud"), f"{reference} is not an Offload image"
    return name.removeprefix("offload-")


def yaml_documents(path: Path) -> list[Document]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document is not None]


def kubernetes_documents() -> list[Document]:
    return [document for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")) for document in yaml_documents(path)]


def by_kind(documents: list[Document]) -> dict[str, Document]:
    kinds = [document["kind"] for document in documents]
    assert len(set(kinds)) == len(kinds), f"one object of each kind expected: {kinds}"
    return {document["kind"]: document for document in documents}


def systemd_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> every value given (systemd keys may repeat), comments dropped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@dataclass(frozen=True)
class Workload:
    """One process a deployment file starts: its command line and its environment (the image's ENV and
    what the file adds)."""

    where: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def command(self) -> str:
        return self.argv[1]

    def settings(self) -> EdgeSettings | CloudSettings:
        """The settings this environment gives, validated (pending ones left out); the rest are defaults."""
        cls = SETTINGS[self.command]
        prefix = str(cls.model_config.get("env_prefix", ""))
        values = {
            name.removeprefix(prefix).lower(): value for name, value in self.env.items() if name.startswith(prefix)
        }
        return cls.model_validate({key: value for key, value in values.items() if key not in PENDING_SETTINGS})


def _container_workload(where: str, container: Document) -> Workload:
    image = image_of(container["image"])
    env = {variable["name"]: variable["value"] for variable in container.get("env", [])}
    argv = container.get("command") or dockerfile_entrypoint(image)
    return Workload(where, [*argv, *container.get("args", [])], {**dockerfile_env(image), **env})


def workloads() -> Iterator[Workload]:
    for image in SETTINGS:
        yield Workload(f"docker/{image}.Dockerfile", dockerfile_entrypoint(image), dockerfile_env(image))
    for document in kubernetes_documents():
        if document["kind"] == "Deployment":
            for container in document["spec"]["template"]["spec"]["containers"]:
                yield _container_workload(f"kubernetes {document['metadata']['name']}/{container['name']}", container)
    for document in yaml_documents(DEPLOY / "kserve" / "inference-service.yaml"):
        for container in document["spec"]["predictor"]["containers"]:
            yield _container_workload(f"kserve {document['metadata']['name']}/{container['name']}", container)
    for name, service in compose_services().items():
        image = image_of(service["image"])
        argv = service.get("entrypoint") or dockerfile_entrypoint(image)
        env = {**dockerfile_env(image), **service.get("environment", {})}
        yield Workload(f"compose {name}", [*argv, *service.get("command", [])], env)
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        service = systemd_unit(unit)["Service"]
        env = dict(pair.split("=", 1) for line in service.get("Environment", []) for pair in shlex.split(line))
        (exec_start,) = service["ExecStart"]
        yield Workload(f"systemd/{unit.name}", shlex.split(exec_start), env)


def compose_services() -> dict[str, Document]:
    services: dict[str, Document] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    return services
