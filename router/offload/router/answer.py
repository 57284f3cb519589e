"""A request's per-row results while it is being routed: the edge's answer, with the cloud's rows put in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from offload.router.models import Arrays
from offload.router.options import AnsweredBy
from offload.router.upstream import CloudFailure


@dataclass(slots=True)
class Answer:
    outputs: Arrays
    confidence: npt.NDArray[np.float64]
    routes: npt.NDArray[Any]  # object array of AnsweredBy
    # Rows meant for the cloud that got the edge answer because the cloud failed.
    degraded: npt.NDArray[np.bool_]

    @classmethod
    def of(cls, outputs: Arrays, confidence: npt.NDArray[np.float64], routes: npt.NDArray[Any]) -> Answer:
        """Every row answered where `routes` says, none degraded."""
        return cls(outputs, confidence, routes, np.zeros(routes.shape[0], dtype=bool))

    @classmethod
    def from_edge(cls, outputs: Arrays, confidence: npt.NDArray[np.float64]) -> Answer:
        return cls.of(outputs, confidence, routes_of(confidence.shape[0], AnsweredBy.EDGE))

    def put(
        self,
        rows: npt.NDArray[np.intp],
        outputs: Arrays,
        confidence: npt.NDArray[np.float64],
        routes: npt.NDArray[Any],
    ) -> None:
        """Put the cloud's answer for these rows in their places; CloudFailure (and nothing changed)
        when its rows do not fit the edge's."""
        merged = _merge_rows(self.outputs, outputs, rows)
        self.outputs.update(merged)
        self.confidence[rows] = confidence
        self.routes[rows] = routes  # cloud, or cache for rows answered from the cache


def routes_of(rows: int, route: AnsweredBy) -> npt.NDArray[Any]:
    """A routes array of `rows` rows all answered by `route` (np.full is five times slower on object arrays)."""
    routes = np.empty(rows, dtype=object)
    routes.fill(route)
    return routes


def _merge_rows(edge: Arrays, cloud: Arrays, rows: npt.NDArray[np.intp]) -> Arrays:
    """The edge's outputs with the cloud's rows put in their places. Every output is checked before
    any is patched (edge arrays are patched in place when writable), so a misfit changes nothing."""
    for name, edge_rows in edge.items():
        patch = cloud[name]
        if patch.shape[1:] != edge_rows.shape[1:]:
            raise CloudFailure(
                f"the cloud's output {name!r} has row shape {list(patch.shape[1:])}, the edge's "
                f"{list(edge_rows.shape[1:])}; their rows cannot be merged"
            )
    merged: Arrays = {}
    for name, edge_rows in edge.items():
        out = edge_rows if edge_rows.flags.writeable else np.array(edge_rows, copy=True)
        out[rows] = cloud[name]
        merged[name] = out
    return merged
