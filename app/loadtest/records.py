"""The engine's output: one JSON line per finished request, and one per stage change."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from app.loadtest.config import RequestKind

OK = "ok"
"""Status label of a request answered with 2xx (and, for a stream, no in-band error)."""

TIMEOUT = "timeout"
CONNECTION = "connection"
STREAM_ERROR = "stream_error"
"""A stream whose status line was 200 but which carried an error event."""


@dataclass(frozen=True)
class RequestRecord:
    """One finished request. `status` is `ok`, an HTTP status code ("503"), or one of
    timeout/connection/stream_error; `start` is wall-clock seconds, the rest milliseconds."""

    kind: RequestKind
    start: float
    latency_ms: float
    status: str
    ttft_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    output_tokens: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def end(self) -> float:
        return self.start + self.latency_ms / 1000

    def to_json(self) -> str:
        data = asdict(self)
        data["kind"] = self.kind.value
        if not self.itl_ms:
            del data["itl_ms"]
        return json.dumps({"event": "request", **data}, separators=(",", ":"))


@dataclass(frozen=True)
class StageMark:
    """The engine began stage `index` at wall-clock `at`; index -1 marks the end of the run."""

    index: int
    at: float

    def to_json(self) -> str:
        return json.dumps({"event": "stage", "index": self.index, "at": self.at})


END = -1


def parse_line(line: str) -> RequestRecord | StageMark | None:
    """A record or mark from one line; None for a blank or torn line (a file read mid-write)."""
    try:
        data: dict[str, Any] = json.loads(line)
    except ValueError:
        return None
    event = data.pop("event", None)
    if event == "stage":
        return StageMark(int(data["index"]), float(data["at"]))
    if event != "request":
        return None
    data["kind"] = RequestKind(data["kind"])
    return RequestRecord(**data)


class RecordReader:
    """Reads a records file as it grows: each `read_new` returns the complete lines added
    since the last call, so live progress and the final analysis share one reader."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self.records: list[RequestRecord] = []
        self.marks: list[StageMark] = []

    def read_new(self) -> list[RequestRecord]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        new: list[RequestRecord] = []
        for item in _parse(complete.decode("utf-8", errors="replace")):
            if isinstance(item, StageMark):
                self.marks.append(item)
            else:
                new.append(item)
        self.records += new
        return new


def _parse(text: str) -> Iterator[RequestRecord | StageMark]:
    for line in text.splitlines():
        item = parse_line(line)
        if item is not None:
            yield item
