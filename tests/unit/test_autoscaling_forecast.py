"""Forecasters of per-minute request counts, and the back-test that chose the default."""

from __future__ import annotations

import numpy as np
import pytest

from app.autoscaling.config import Predictive
from app.autoscaling.floors import PredictiveFloor
from app.autoscaling.forecast import HoltWinters, SeasonalNaiveTrend, backtest_error

DAY = 1440


def daily_trace(kind: str, days: int = 7, seed: int = 0, scale: float = 100.0) -> np.ndarray:
    """Poisson counts per minute around a daily cycle; `kind` picks the shape."""
    t = np.arange(DAY * days)
    phase = 2 * np.pi * (t % DAY) / DAY
    cycle = 1 + 0.6 * np.sin(phase - np.pi / 2)  # quiet at midnight, busy at noon
    rate = {
        "sine": scale * cycle,
        "trend": scale * cycle * (1 + 0.3 * t / len(t)),
        "two_peaks": 0.8
        * scale
        * (
            1
            + np.exp(-((((t % DAY) - 540) / 90) ** 2))
            + 0.8 * np.exp(-((((t % DAY) - 1200) / 120) ** 2))
        ),
        "weekend": scale * cycle * np.where((t // DAY) % 7 >= 5, 0.6, 1.0),
        "level_shift": scale * cycle * np.where(t >= DAY * (days - 1) - DAY // 2, 1.3, 1.0),
        "quiet": 0.05 * scale * cycle,
    }[kind]
    return np.random.default_rng(seed).poisson(rate).astype(float)


KINDS = ["sine", "trend", "two_peaks", "weekend", "level_shift", "quiet"]


def test_backtest_chooses_seasonal_naive_with_trend() -> None:
    """The comparison behind the default (numbers in forecast.py's docstring): the default
    is at least as accurate as Holt-Winters across the traces, and both pass the gate."""
    naive, holt = SeasonalNaiveTrend(), HoltWinters()
    errors = {
        kind: (backtest_error(trace, naive, folds=12), backtest_error(trace, holt, folds=12))
        for kind, trace in ((k, daily_trace(k)) for k in KINDS)
    }
    for kind, (e_naive, e_holt) in errors.items():
        assert e_naive is not None and e_holt is not None
        assert e_naive < 0.25 and e_holt < 0.25, (kind, e_naive, e_holt)
    mean_naive = float(np.mean([e[0] for e in errors.values()]))
    mean_holt = float(np.mean([e[1] for e in errors.values()]))
    assert mean_naive <= mean_holt, errors
    assert 0.04 < mean_naive < 0.07, errors  # at the noise floor of Poisson counts
    assert isinstance(PredictiveFloor(Predictive()).forecaster, SeasonalNaiveTrend)


def test_seasonal_naive_is_exact_on_a_noiseless_cycle_with_trend() -> None:
    t = np.arange(DAY * 4)
    y = 100 + 50 * np.sin(2 * np.pi * t / DAY) + 0.01 * t
    future = np.arange(len(y), len(y) + 60)
    expected = 100 + 50 * np.sin(2 * np.pi * future / DAY) + 0.01 * future
    assert np.allclose(SeasonalNaiveTrend().forecast(y, 60), expected, atol=1e-6)
    assert backtest_error(y) == pytest.approx(0.0, abs=1e-6)


def test_holt_winters_follows_a_noiseless_cycle() -> None:
    t = np.arange(DAY * 3)
    y = 100 + 50 * np.sin(2 * np.pi * t / DAY)
    future = np.arange(len(y), len(y) + 60)
    expected = 100 + 50 * np.sin(2 * np.pi * future / DAY)
    assert np.abs(HoltWinters().forecast(y, 60) - expected).max() < 2.0


def test_seasonal_naive_follows_a_level_change_within_the_hour() -> None:
    y = np.full(DAY * 3, 100.0)
    y[-120:] = 150.0  # a launch two hours ago
    assert SeasonalNaiveTrend().forecast(y, 10) == pytest.approx(np.full(10, 150.0))


def test_short_history_falls_back_to_the_recent_mean() -> None:
    y = np.r_[np.full(100, 10.0), np.full(60, 40.0)]
    assert SeasonalNaiveTrend().forecast(y, 5) == pytest.approx(np.full(5, 40.0))
    assert HoltWinters().forecast(y, 5) == pytest.approx(np.full(5, 40.0))


def test_forecasts_are_never_negative() -> None:
    y = np.r_[np.full(DAY, 100.0), np.full(DAY, 0.0)]  # steep downward trend
    assert SeasonalNaiveTrend().forecast(y, 60).min() >= 0


@pytest.mark.parametrize(("minutes", "expected_none"), [(DAY + 59, True), (DAY + 60, False)])
def test_backtest_needs_a_season_plus_a_horizon(minutes: int, expected_none: bool) -> None:
    y = np.full(minutes, 10.0)
    assert (backtest_error(y, horizon=60) is None) is expected_none


def test_backtest_error_grows_with_noise() -> None:
    quiet = backtest_error(daily_trace("sine", days=4, scale=2000))
    noisy = backtest_error(daily_trace("sine", days=4, scale=20))
    assert quiet is not None and noisy is not None and quiet < 0.02 < noisy
