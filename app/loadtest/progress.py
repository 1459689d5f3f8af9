"""Live progress on stderr while the engine runs: a line per stage change and every few seconds."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence

from app.loadtest.analysis import percentiles
from app.loadtest.config import LoadTestConfig
from app.loadtest.records import END, RecordReader, RequestRecord
from app.loadtest.resources import ResourceSample


def window_line(
    records: Sequence[RequestRecord], window_s: float, sample: ResourceSample | None
) -> str:
    """Throughput, p95 and errors of the requests that finished in the last `window_s`."""
    ok = [r for r in records if r.ok]
    failed = Counter(r.status for r in records if not r.ok)
    p95 = percentiles([r.latency_ms for r in ok]).p95
    errors = f"errors {len(records) - len(ok)}"
    if failed:
        errors += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(failed.items())) + ")"
    parts = [
        f"{len(ok) / window_s:.1f} req/s ok",
        "p95 -" if p95 is None else f"p95 {p95:.0f} ms",
        errors,
    ]
    if sample is not None:
        parts.append(
            f"CPU {_pct(sample.cpu_percent)} mem {_pct(sample.memory_percent)} "
            f"GPU {_pct(sample.gpu_percent)}"
        )
    return " | ".join(parts)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


class Progress:
    """Called by the engine as it polls: reads new records and prints when due."""

    def __init__(
        self,
        config: LoadTestConfig,
        reader: RecordReader,
        latest_sample: Callable[[], ResourceSample | None] = lambda: None,
        every_s: float = 5.0,
        write: Callable[[str], None] | None = None,
        get_curr_time_s: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.reader = reader
        self.latest_sample = latest_sample
        self.every_s = every_s
        self.write = write or _stderr
        self.get_curr_time_s = get_curr_time_s
        self._window: list[RequestRecord] = []
        self._since = get_curr_time_s()
        self._marks_seen = 0

    def __call__(self) -> None:
        self._window += self.reader.read_new()
        for mark in self.reader.marks[self._marks_seen :]:
            self._marks_seen += 1
            if mark.index == END:
                self.write("stages done")
            else:
                stage = self.config.stages[mark.index]
                self.write(
                    f"stage {mark.index + 1}/{len(self.config.stages)}: {stage.label} "
                    f"for {stage.duration_s:g} s"
                )
        now = self.get_curr_time_s()
        if not self._marks_seen:  # the engine is still starting
            self._since = now
        elif now - self._since >= self.every_s:
            self.write(window_line(self._window, now - self._since, self.latest_sample()))
            self._window, self._since = [], now


def _stderr(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)
