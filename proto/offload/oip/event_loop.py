"""Which asyncio event loop a server runs on: uvloop where it is installed (the default), else asyncio's own.

A grpc.aio server spends much of each call in the event loop (waking on the poller thread's signal,
running the call's callbacks), so the loop's own cost shows in every call: in benchmarks/RESULTS.md
(Throughput) uvloop served a bare grpc.aio echo 1.3x the calls per second of asyncio's loop under
load, and `offload cloud` 1.08x. The edge agent gains less (its time is in its own work). uvloop is
part of the `edge` and `cloud` extras on Linux and macOS; `event_loop = "asyncio"` opts out.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

from offload.oip.errors import ConfigurationError

log = logging.getLogger(__name__)

EventLoop = Literal["auto", "uvloop", "asyncio"]
_Result = TypeVar("_Result")


def uvloop_installed() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def chosen_loop(choice: EventLoop) -> Literal["uvloop", "asyncio"]:
    """The loop `choice` stands for here; ConfigurationError for uvloop where it is not installed."""
    if choice == "asyncio":
        return "asyncio"
    if uvloop_installed():
        return "uvloop"
    if choice == "uvloop":
        raise ConfigurationError(
            "event_loop is 'uvloop' but uvloop is not installed; pip install uvloop (it comes with the "
            "offload[edge] and offload[cloud] extras on Linux and macOS), or set event_loop = 'auto' or 'asyncio'"
        )
    return "asyncio"


def run(main: Coroutine[Any, Any, _Result], choice: EventLoop = "auto") -> _Result:
    """asyncio.run(main) on the chosen loop."""
    if chosen_loop(choice) == "uvloop":
        import uvloop

        log.debug("running on uvloop %s", importlib.metadata.version("uvloop"))
        return uvloop.run(main)
    return asyncio.run(main)
