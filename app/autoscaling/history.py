"""Where per-minute request counts live between controller restarts: the `RateHistory` protocol,
and an in-memory implementation for tests (the KV-store one is app.kv's)."""

from __future__ import annotations

from typing import Protocol


class RateHistory(Protocol):
    """Per-model, per-region request counts, one per minute (`minute` is epoch seconds // 60).
    Appending a minute again replaces its count, so a retried write cannot double it; the
    recorder sums every replica's count for that minute before it appends."""

    def append(self, model: str, region: str, minute: int, count: int) -> None: ...

    def load(self, model: str, region: str, since: int) -> list[tuple[int, int]]:
        """(minute, count) pairs with minute >= since, oldest first."""
        ...


class InMemoryRateHistory:
    """A RateHistory in a dict; keeps at most `retention_minutes` per series (oldest go)."""

    def __init__(self, retention_minutes: int = 8 * 1440) -> None:
        self.retention_minutes = retention_minutes
        self._series: dict[tuple[str, str], dict[int, int]] = {}

    def append(self, model: str, region: str, minute: int, count: int) -> None:
        series = self._series.setdefault((model, region), {})
        series[minute] = count
        if len(series) > self.retention_minutes:
            cutoff = max(series) - self.retention_minutes
            for old in [m for m in series if m <= cutoff]:
                del series[old]

    def load(self, model: str, region: str, since: int) -> list[tuple[int, int]]:
        series = self._series.get((model, region), {})
        return sorted((m, c) for m, c in series.items() if m >= since)
