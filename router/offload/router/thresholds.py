"""The confidence a row needs to stay on the edge: the caller's threshold, else the online budget's,
else the model's."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from offload.router.budget import AdaptiveThreshold
from offload.router.models import RoutedModel
from offload.router.options import RoutingOptions


class Thresholds:
    """Per model: the configured threshold, or with `target_offload` an online budget that follows live traffic."""

    def __init__(self, models: Mapping[str, RoutedModel], target_offload: float | None = None) -> None:
        self._models = dict(models)
        self._target_offload = target_offload
        # Online budget: per model, a threshold that keeps the offload share near the target.
        self._budgets = {name: AdaptiveThreshold(target_offload) for name in self._models} if target_offload else {}

    def replace_models(self, models: Mapping[str, RoutedModel]) -> None:
        """Follow a new model set: a model kept as it was (the same object) keeps its online budget; a new or
        changed one starts a fresh budget, since the confidences the old one learned were another model's."""
        old = self._models
        self._models = dict(models)
        if self._target_offload:
            target = self._target_offload
            self._budgets = {
                name: self._budgets[name] if old.get(name) is model else AdaptiveThreshold(target)
                for name, model in self._models.items()
            }

    def for_rows(self, model: RoutedModel, options: RoutingOptions, confidence: npt.NDArray[np.float64]) -> float:
        """The threshold for a request's rows; the online budget, if any, learns their confidences."""
        if options.threshold is not None:
            return options.threshold
        budget = self._budgets.get(model.name)
        if budget is None or self._models.get(model.name) is not model:
            # No budget, or a call still in flight on a model since replaced: its rows must not teach the
            # new model's budget, so they are judged by the threshold the model was configured with.
            return model.routing.threshold
        budget.observe(confidence)
        return budget.threshold(model.routing.threshold)

    def current(self) -> dict[str, float]:
        """Per model, the threshold a request without its own would be judged by now."""
        current: dict[str, float] = {}
        for name, model in self._models.items():
            budget = self._budgets.get(name)
            default = model.routing.threshold
            current[name] = default if budget is None else budget.threshold(default)
        return current
