"""The servers' event loop: uvloop where it is installed (it is, with the test extras), asyncio's on request."""

from __future__ import annotations

import asyncio
import sys

import pytest

from offload.cloud.settings import CloudSettings
from offload.edge.settings import EdgeSettings
from offload.oip import event_loop
from offload.oip.errors import ConfigurationError


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_auto_runs_on_uvloop_where_it_is_installed_and_asyncio_on_request() -> None:
    assert event_loop.run(_loop_module()).startswith("uvloop")
    assert event_loop.run(_loop_module(), "uvloop").startswith("uvloop")
    assert event_loop.run(_loop_module(), "asyncio").startswith("asyncio")


def test_without_uvloop_auto_falls_back_and_asking_for_it_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what `import uvloop` finds where it is not installed
    assert event_loop.chosen_loop("auto") == "asyncio"
    with pytest.raises(ConfigurationError, match=r"pip install uvloop"):
        event_loop.chosen_loop("uvloop")


def test_both_servers_take_the_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert EdgeSettings().event_loop == CloudSettings().event_loop == "auto"
    monkeypatch.setenv("OFFLOAD_EDGE_EVENT_LOOP", "asyncio")
    assert EdgeSettings().event_loop == "asyncio"
