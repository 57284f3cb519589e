"""Routing parameters a caller sets per request, parsed and validated."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from offload.oip.errors import InvalidArgument
from offload.oip.types import ParameterValue

PREFIX = "offload_"


class Route(StrEnum):
    AUTO = "auto"
    EDGE = "edge"
    CLOUD = "cloud"


class AnsweredBy(StrEnum):
    """Where a row's answer was computed (response parameter and details output)."""

    EDGE = "edge"
    CLOUD = "cloud"
    CACHE = "cache"
    MIXED = "mixed"


# Request parameters (names as they travel).
THRESHOLD = "offload_threshold"
ROUTE = "offload_route"
DETAILS = "offload_details"
REQUIRE_CLOUD = "offload_require_cloud"
# Response parameters and the details outputs.
RESPONSE_ROUTE = "offload_route"
RESPONSE_CONFIDENCE = "offload_confidence"
RESPONSE_OFFLOADED_ROWS = "offload_offloaded_rows"
RESPONSE_DEGRADED = "offload_degraded"
KNOWN = {THRESHOLD, ROUTE, DETAILS, REQUIRE_CLOUD}
_ROUTES = {route.value: route for route in Route}


@dataclass(frozen=True, slots=True)
class RoutingOptions:
    route: Route = Route.AUTO
    threshold: float | None = None
    details: bool = False
    # Rather UNAVAILABLE / DEADLINE_EXCEEDED than an edge answer when the cloud fails.
    require_cloud: bool = False

    @classmethod
    def from_parameters(cls, parameters: dict[str, ParameterValue]) -> RoutingOptions:
        unknown = [key for key in parameters if key.startswith(PREFIX) and key not in KNOWN]
        if unknown:
            raise InvalidArgument(f"unknown routing parameter {min(unknown)!r}; known: {sorted(KNOWN)}")
        return cls(
            route=_route(parameters.get(ROUTE)),
            threshold=_threshold(parameters.get(THRESHOLD)),
            details=_flag(parameters.get(DETAILS), DETAILS),
            require_cloud=_flag(parameters.get(REQUIRE_CLOUD), REQUIRE_CLOUD),
        )


def forwarded(parameters: dict[str, ParameterValue]) -> dict[str, ParameterValue]:
    """The parameters meant for the model server: everything but the routing ones."""
    return {key: value for key, value in parameters.items() if not key.startswith(PREFIX)}


def _route(value: ParameterValue | None) -> Route:
    if value is None:
        return Route.AUTO
    route = _ROUTES.get(value) if isinstance(value, str) else None
    if route is None:
        raise InvalidArgument(f"parameter {ROUTE!r} must be a string, one of {list(_ROUTES)}; got {value!r}")
    return route


def _threshold(value: ParameterValue | None) -> float | None:
    if value is None:
        return None
    # Clients without Triton's double_param send numbers as int64 (0, 1) or strings.
    if isinstance(value, bool):
        raise InvalidArgument(f"parameter {THRESHOLD!r} must be a number in [0, 1]; got a bool")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InvalidArgument(f"parameter {THRESHOLD!r} must be a number in [0, 1]; got {value!r}") from None
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise InvalidArgument(f"parameter {THRESHOLD!r} must be in [0, 1]; got {number}")
    return number


def _flag(value: ParameterValue | None, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidArgument(f"parameter {name!r} must be a bool; got {value!r}")
    return value
