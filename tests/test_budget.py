"""The online offload budget: a threshold from a bounded window of recent confidences."""

from __future__ import annotations

import numpy as np
import pytest

from offload.router.budget import AdaptiveThreshold


def _traffic(seed: int, rows: int, a: float, b: float) -> np.ndarray:
    """Confidences in [0, 1] from a Beta(a, b) distribution: a >> b is a confident model's traffic."""
    return np.random.default_rng(seed).beta(a, b, size=rows)


def test_default_until_enough_samples() -> None:
    budget = AdaptiveThreshold(0.2, window=128, min_samples=10)
    assert budget.threshold(default=0.9) == 0.9
    budget.observe(np.linspace(0.0, 1.0, 9))
    assert budget.samples == 9
    assert budget.threshold(default=0.9) == 0.9
    budget.observe([0.5])
    assert budget.threshold(default=0.9) != 0.9


def test_threshold_offloads_the_target_share_of_the_window() -> None:
    values = np.arange(100) / 100.0  # 0.00, 0.01, ..., 0.99
    budget = AdaptiveThreshold(0.15, window=100, min_samples=1)
    budget.observe(values)
    threshold = budget.threshold(default=0.5)
    assert threshold == pytest.approx(0.145)  # midway between the 15th and 16th confidences
    assert budget.offload_share(threshold) == 0.15
    assert np.mean(values < threshold) == 0.15


def test_a_shift_in_traffic_moves_the_threshold_back_to_the_target() -> None:
    target = 0.1
    budget = AdaptiveThreshold(target, window=2048, min_samples=64)
    budget.observe(_traffic(0, 4096, 8.0, 1.0))
    before = budget.threshold(default=0.9)
    assert np.mean(_traffic(1, 20_000, 8.0, 1.0) < before) == pytest.approx(target, abs=0.015)

    # The traffic turns harder for the edge model: with the old threshold the cloud share would triple.
    shifted = _traffic(2, 20_000, 3.0, 1.0)
    assert np.mean(shifted < before) > 3 * target
    for chunk in np.array_split(_traffic(3, 4096, 3.0, 1.0), 64):  # batches as they arrive
        budget.observe(chunk)
    after = budget.threshold(default=0.9)
    assert after < before
    assert np.mean(shifted < after) == pytest.approx(target, abs=0.015)


def test_memory_is_bounded_and_only_the_latest_window_counts() -> None:
    budget = AdaptiveThreshold(0.5, window=1000, min_samples=1)
    assert budget.nbytes == 8000
    for start in range(0, 100_000, 777):  # chunks that wrap the ring at every offset
        budget.observe(np.full(777, 0.25 if start < 50_000 else 0.75))
    assert budget.samples == 1000
    assert budget.nbytes == 8000
    # Only the recent 0.75s are in the window; all tied, so no threshold splits them.
    assert budget.offload_share(budget.threshold(default=0.5)) == 0.0


def test_ring_buffer_keeps_exactly_the_most_recent_values() -> None:
    rng = np.random.default_rng(4)
    stream = rng.random(30 * 700)
    budget = AdaptiveThreshold(0.3, window=512, min_samples=1)
    position = 0
    for size in rng.integers(1, 700, size=30):
        budget.observe(stream[position : position + size])
        position += size
    recent = stream[max(0, position - 512) : position]
    np.testing.assert_array_equal(budget.recent(), recent)
    threshold = budget.threshold(default=0.5)
    assert np.mean(recent < threshold) == np.floor(0.3 * recent.size) / recent.size


def test_ties_never_push_the_offload_over_the_target() -> None:
    budget = AdaptiveThreshold(0.25, window=100, min_samples=1)
    budget.observe([0.1] * 10 + [0.5] * 40 + [0.9] * 50)
    threshold = budget.threshold(default=0.5)
    # Offloading the 0.5s would make it 50%: only the ten 0.1s go.
    assert budget.offload_share(threshold) == 0.1
    assert 0.1 < threshold <= 0.5


@pytest.mark.parametrize(("target", "share"), [(0.0, 0.0), (1.0, 1.0)])
def test_extreme_targets(target: float, share: float) -> None:
    budget = AdaptiveThreshold(target, window=64, min_samples=1)
    budget.observe(np.linspace(0.0, 1.0, 64))
    assert budget.offload_share(budget.threshold(default=0.5)) == share


def test_non_finite_confidences_are_skipped() -> None:
    budget = AdaptiveThreshold(0.5, window=8, min_samples=1)
    budget.observe([np.nan, 0.2, np.inf, 0.4])
    assert budget.samples == 2


@pytest.mark.parametrize(
    ("arguments", "message"),
    [((1.5,), "target_offload"), ((0.1, 0), "window"), ((0.1, 16, 17), "min_samples"), ((0.1, 16, 0), "min_samples")],
)
def test_invalid_settings_are_refused(arguments: tuple[float, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaptiveThreshold(*arguments)  # type: ignore[arg-type]
