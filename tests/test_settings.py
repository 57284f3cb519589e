"""Configuration precedence, as the README promises it: flags, then environment, then the --config file, then defaults.

Through the settings loading the `offload` command uses (`load_settings`, where a flag of None
is one not given) for both components, and once through the real `offload edge` command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic_settings import BaseSettings

from conftest import SUBPROCESS_ENV
from offload.cloud.settings import CloudSettings
from offload.edge.settings import EdgeSettings
from offload.oip.settings import load_settings
from offload.tools.process import ServerProcess

# (settings, field, its environment variable, a value for each of: the file, the environment, a flag)
FIELDS = [
    pytest.param(EdgeSettings, "cloud", "OFFLOAD_EDGE_CLOUD", ("file:1", "env:2", "flag:3"), id="edge-cloud"),
    pytest.param(
        EdgeSettings,
        "cloud_timeout_seconds",
        "OFFLOAD_EDGE_CLOUD_TIMEOUT_SECONDS",
        (2.5, 3.5, 4.5),
        id="edge-cloud_timeout_seconds",
    ),
    pytest.param(EdgeSettings, "grpc_port", "OFFLOAD_EDGE_GRPC_PORT", (9001, 9002, 9003), id="edge-grpc_port"),
    pytest.param(
        CloudSettings, "inference_threads", "OFFLOAD_CLOUD_INFERENCE_THREADS", (3, 4, 5), id="cloud-inference_threads"
    ),
    pytest.param(CloudSettings, "device", "OFFLOAD_CLOUD_DEVICE", ("cuda:1", "cuda:2", "cpu"), id="cloud-device"),
]  # fmt: skip


def _toml(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


@pytest.mark.parametrize(("settings", "field", "variable", "values"), FIELDS)
def test_flags_override_the_environment_which_overrides_the_config_file_which_overrides_defaults(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    settings: type[BaseSettings],
    field: str,
    variable: str,
    values: tuple[Any, Any, Any],
) -> None:
    in_file, in_environment, as_flag = values
    config = tmp_path / "offload.toml"
    config.write_text(f"{field} = {_toml(in_file)}\n")
    monkeypatch.delenv(variable, raising=False)
    default = settings.model_fields[field].default
    assert default not in values, "the test values must differ from the default"

    assert getattr(load_settings(settings, None, **{field: None}), field) == default
    assert getattr(load_settings(settings, config, **{field: None}), field) == in_file
    monkeypatch.setenv(variable, str(in_environment))
    assert getattr(load_settings(settings, None, **{field: None}), field) == in_environment
    assert getattr(load_settings(settings, config, **{field: None}), field) == in_environment
    assert getattr(load_settings(settings, config, **{field: as_flag}), field) == as_flag


def test_the_edge_command_takes_each_setting_from_the_highest_layer_that_gives_it(tmp_path: Path) -> None:
    """host: file, environment and flag give it, the flag wins; cloud: file and environment, the environment
    wins; log_level: only the file, which beats the default (INFO). The listening line shows the first two,
    DEBUG lines the third."""
    config = tmp_path / "edge.toml"
    config.write_text('host = "127.0.0.3"\ncloud = "file-cloud:1"\nlog_level = "DEBUG"\n')
    env = {**SUBPROCESS_ENV, "OFFLOAD_EDGE_HOST": "127.0.0.2", "OFFLOAD_EDGE_CLOUD": "env-cloud:2"}
    args = ["edge", "--config", str(config), "--host", "127.0.0.1", "--grpc-port", "0"]
    with ServerProcess(args, env=env) as edge:
        edge.start()
        output = edge.output()
    listening = next(line for line in output.splitlines() if "offload-edge listening on" in line)
    assert listening.startswith(f"offload-edge listening on 127.0.0.1:{edge.address.rsplit(':', 1)[1]} "), listening
    assert "(cloud: env-cloud:2;" in listening, listening
    assert " DEBUG " in output, f"the file's log_level did not apply:\n{output}"
