"""The cloud's answer for some rows of a request: from the row cache, from an identical row's call
already in flight (single-flight), or from a new call to the upstream, which the rows of concurrent
requests may share (coalesce.py).

Every failure is a CloudFailure, which the router answers from the edge. Whoever wants the cloud's new
answers as they arrive (the edge agent's recording, for distillation) gives a CloudRowsHook.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import numpy as np
import numpy.typing as npt

from offload.oip.errors import InvalidArgument
from offload.oip.tensors import Tensor
from offload.oip.types import InferRequest, InferResponse, ParameterValue
from offload.oip.validation import check_tensor
from offload.router.answer import routes_of
from offload.router.cache import FetchAbandoned, RowCache, RowOutputs
from offload.router.coalesce import CoalescePolicy, Coalescer, Send
from offload.router.models import Arrays, RoutedModel
from offload.router.options import AnsweredBy, forwarded
from offload.router.stats import CoalesceStats
from offload.router.upstream import CloudFailure, Upstream

log = logging.getLogger(__name__)


class CloudRowsHook(Protocol):
    """Told of every row a cloud call answered: `inputs` as sent, `outputs` (every output of the model) as
    the cloud answered them, and the version of the cloud model that answered. Cached rows and rows shared
    from another request's call are not new answers and are not told. It is called on the event loop while
    the request waits, so it must return at once (hand the rows to a thread), and keep the arrays unchanged."""

    def __call__(self, model: RoutedModel, inputs: Arrays, outputs: Arrays, cloud_version: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Fetched:
    """The cloud's answer for the rows asked for, in their order."""

    outputs: Arrays  # every output of the model
    routes: npt.NDArray[Any]  # per row: AnsweredBy.CLOUD, or CACHE when the row cache had it


class RowFetcher:
    """Gets the cloud's rows from `upstream`, through `cache` when there is one, in calls that concurrent
    requests' rows share as `coalesce` says (None: each request's rows in a call of its own). Without an
    upstream every fetch is a CloudFailure (an edge-only router). `on_cloud_rows` is told of every new
    answer (once per call: the rows of a shared call together)."""

    def __init__(
        self,
        upstream: Upstream | None,
        cache: RowCache | None = None,
        on_cloud_rows: CloudRowsHook | None = None,
        coalesce: CoalescePolicy | None = None,
    ) -> None:
        self.upstream = upstream
        self.cache = cache
        self.on_cloud_rows = on_cloud_rows
        self._coalescer: Coalescer | None = None
        self._send: Send | None = None
        if upstream is not None:
            self._send = functools.partial(_call, upstream, on_cloud_rows=on_cloud_rows)
            if coalesce is not None and coalesce.enabled:
                self._coalescer = Coalescer(self._send, coalesce)
                self._send = self._coalescer.call

    def coalescing(self) -> CoalesceStats | None:
        return None if self._coalescer is None else self._coalescer.stats()

    async def close(self) -> None:
        if self._coalescer is not None:
            await self._coalescer.close()
        if self.upstream is not None:
            await self.upstream.close()

    async def fetch(
        self,
        model: RoutedModel,
        request: InferRequest,
        inputs: Arrays,
        rows: npt.NDArray[np.intp],
        deadline: float | None,
    ) -> Fetched:
        """The cloud's answer for these rows of the request's inputs, by `deadline` (time.monotonic())."""
        if self._send is None:
            raise CloudFailure("this agent has no cloud configured (start it with --cloud HOST:PORT)")
        specs = {spec.name: spec for spec in model.edge.inputs}
        all_rows = rows.size == next(iter(inputs.values())).shape[0]
        tensors = [
            Tensor(name, specs[name].datatype, data if all_rows else data[rows]) for name, data in inputs.items()
        ]
        parameters = forwarded(request.parameters)
        if self.cache is None or rows.size == 0:
            outputs, _ = await self._send(model, request.id, tensors, parameters, deadline)
            return Fetched(outputs, routes_of(rows.size, AnsweredBy.CLOUD))
        return await _cached(self._send, self.cache, model, request.id, tensors, parameters, deadline)


async def _call(
    upstream: Upstream,
    model: RoutedModel,
    request_id: str,
    tensors: list[Tensor],
    parameters: dict[str, ParameterValue],
    deadline: float | None,
    on_cloud_rows: CloudRowsHook | None,
) -> tuple[Arrays, str]:
    """One upstream request for these rows: their outputs and the cloud model's version (told to on_cloud_rows);
    with `upstream` and `on_cloud_rows` bound, a `Send`."""
    sub_request = InferRequest(
        model_name=model.cloud_model,
        model_version=model.routing.cloud_version,
        id=request_id,
        inputs=tensors,
        parameters=parameters,
    )
    expected_rows = tensors[0].shape[0]

    def validate(response: InferResponse) -> None:
        _check_cloud_outputs(model, response, expected_rows)

    response = await upstream.infer(sub_request, deadline, validate)
    produced = response.as_dict()
    outputs = {spec.name: produced[spec.name].data for spec in model.edge.outputs}
    if on_cloud_rows is not None:
        try:
            on_cloud_rows(model, {tensor.name: tensor.data for tensor in tensors}, outputs, response.model_version)
        except Exception:
            # The answer itself is good: a failing observer must not cost the caller the cloud's rows.
            log.exception("the on_cloud_rows hook failed; the cloud's answer is used all the same")
    return outputs, response.model_version


async def _cached(
    send: Send,
    cache: RowCache,
    model: RoutedModel,
    request_id: str,
    tensors: list[Tensor],
    parameters: dict[str, ParameterValue],
    deadline: float | None,
) -> Fetched:
    """The rows through the cache: hits from it, rows another request is fetching from that call,
    the rest in one call of our own, whose answers are stored and shared with whoever waits on them."""
    plan = cache.plan(cache.keys(model.cache_scope, tensors, parameters))
    answers: dict[int, RowOutputs] = dict(plan.hits)
    routes = routes_of(len(plan.keys), AnsweredBy.CLOUD)
    routes[list(plan.hits)] = AnsweredBy.CACHE
    if plan.sends:
        picked = np.asarray(plan.sends)
        to_send = [Tensor(t.name, t.datatype, t.data[picked]) for t in tensors]
        try:
            outputs, version = await send(model, request_id, to_send, parameters, deadline)
        except BaseException as exc:
            cache.fail(plan, _shared_failure(exc))
            raise
        sent = [{name: array[i] for name, array in outputs.items()} for i in range(len(plan.sends))]
        cache.fulfil(plan, model.name, version, sent)
        answers.update(zip(plan.sends, sent, strict=True))
    if plan.waits:
        refetch = await _wait_for_shared_rows(plan.waits, answers, deadline)
        if refetch:
            # Their sender gave up early; fetch them under this request's own deadline.
            picked = np.asarray(refetch)
            subset = [Tensor(t.name, t.datatype, t.data[picked]) for t in tensors]
            fetched = await _cached(send, cache, model, request_id, subset, parameters, deadline)
            for i, position in enumerate(refetch):
                answers[position] = {name: array[i] for name, array in fetched.outputs.items()}
                routes[position] = fetched.routes[i]
    for position, original in plan.duplicates.items():
        answers[position] = answers[original]
        routes[position] = routes[original]
    rows = len(plan.keys)
    outputs = {spec.name: np.stack([answers[i][spec.name] for i in range(rows)]) for spec in model.edge.outputs}
    return Fetched(outputs, routes)


async def _wait_for_shared_rows(
    waits: Mapping[int, asyncio.Future[RowOutputs]], answers: dict[int, RowOutputs], deadline: float | None
) -> list[int]:
    """Wait for rows another request is fetching; put them in `answers`. Returns the positions whose
    sender gave up on its own account (deadline, cancellation), which the caller fetches itself."""
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    waiting = [asyncio.shield(future) for future in waits.values()]
    try:
        results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), timeout)
    except TimeoutError as exc:
        raise CloudFailure(
            "an identical request's cloud call did not finish in time", grpc.StatusCode.DEADLINE_EXCEEDED
        ) from exc
    refetch: list[int] = []
    for position, result in zip(waits, results, strict=True):
        if isinstance(result, FetchAbandoned):
            refetch.append(position)
        elif isinstance(result, CloudFailure):
            # A fresh exception per waiter: one instance raised in many tasks would share a traceback.
            raise CloudFailure(str(result), result.status)
        elif isinstance(result, BaseException):
            raise result
        else:
            answers[position] = result
    return refetch


def _check_cloud_outputs(model: RoutedModel, response: InferResponse, rows: int) -> None:
    """Refuse an answer that does not fit the model (a broken or wrong server): InvalidArgument."""
    produced = response.as_dict()
    for spec in model.edge.outputs:
        tensor = produced.get(spec.name)
        if tensor is None:
            raise InvalidArgument(f"the answer lacks output {spec.name!r}")
        check_tensor(tensor, spec, f"output {spec.name!r}")
        if tensor.shape[0] != rows:
            raise InvalidArgument(f"the answer has {tensor.shape[0]} rows of {spec.name!r} for {rows} sent")


def _shared_failure(exc: BaseException) -> BaseException:
    """What requests waiting on a failed call's rows get: the cloud's failure as it is, but
    FetchAbandoned when the sender gave up for its own reasons (its deadline, its caller gone), so
    that a waiter with a later deadline is not failed by another caller's impatience."""
    if isinstance(exc, asyncio.CancelledError):
        return FetchAbandoned("the request fetching this row was cancelled")
    if isinstance(exc, CloudFailure):
        if exc.status == grpc.StatusCode.DEADLINE_EXCEEDED:
            return FetchAbandoned(f"the request fetching this row ran out of time: {exc}")
        return exc
    return CloudFailure(f"the cloud call failed: {exc!r}")
