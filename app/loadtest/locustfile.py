"""The Locust side of `app loadtest`: users sending the request mix, and a shape holding the
stages. Loaded only by the engine's Locust process (`app.loadtest.engine`), never by the CLI:
Locust patches the standard library with gevent when it is imported.

The plan comes from the JSON file named by $APP_LOADTEST_PLAN, the API key from
$APP_LOADTEST_API_KEY. Every finished request becomes one line of the records file; the
parent process reads that file for live progress and the analysis, and ignores Locust's own
statistics, which lack time to first token and inter-token latency.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from pathlib import Path
from typing import IO, Any

import gevent
from locust import LoadTestShape, events, task
from locust.contrib.fasthttp import FastHttpUser, FastResponse

from app.loadtest.config import LoadTestConfig, RequestKind, Stage
from app.loadtest.engine import API_KEY_ENV, PLAN_ENV
from app.loadtest.records import (
    CONNECTION,
    END,
    OK,
    STREAM_ERROR,
    TIMEOUT,
    RequestRecord,
    StageMark,
)
from app.loadtest.workload import PlannedRequest, StreamTally, Workload, usage_tokens

FLUSH_EVERY_S = 0.5


def _plan() -> tuple[LoadTestConfig, dict[RequestKind, str], Path]:
    plan = json.loads(Path(os.environ[PLAN_ENV]).read_text())
    models = {RequestKind(kind): model for kind, model in plan["models"].items()}
    return LoadTestConfig.model_validate(plan["config"]), models, Path(plan["records"])


CONFIG, MODELS, RECORDS = _plan()
_USER_SEEDS = itertools.count()


class RecordWriter:
    """Buffers record lines and flushes them every half second, so the parent sees them soon
    without a write per request."""

    def __init__(self, path: Path) -> None:
        self._file: IO[str] = path.open("a", buffering=1 << 16)

    def write(self, line: str) -> None:
        self._file.write(line + "\n")

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def flush_forever(self) -> None:
        while not self._file.closed:
            gevent.sleep(FLUSH_EVERY_S)
            self.flush()


WRITER = RecordWriter(RECORDS)


@events.test_start.add_listener
def _start_flushing(**_: Any) -> None:
    gevent.spawn(WRITER.flush_forever)


@events.quitting.add_listener
def _close(**_: Any) -> None:
    WRITER.close()


class StagesShape(LoadTestShape):
    """Holds each stage for its duration, marks each start in the records, then stops."""

    def __init__(self) -> None:
        super().__init__()
        self.index: int | None = None

    @property
    def stage(self) -> Stage | None:
        return None if self.index is None or self.index < 0 else CONFIG.stages[self.index]

    def tick(self) -> tuple[int, float] | None:
        index, elapsed = END, self.get_run_time()
        for i, held in enumerate(CONFIG.stages):
            if elapsed < held.duration_s:
                index = i
                break
            elapsed -= held.duration_s
        if index != self.index:
            self.index = index
            WRITER.write(StageMark(index, time.time()).to_json())
            WRITER.flush()
        stage = self.stage
        if stage is None:
            return None
        return stage.user_count, stage.spawn_rate or float(stage.user_count)


class OpenAIUser(FastHttpUser):
    host = CONFIG.base_url
    network_timeout = CONFIG.request_timeout_s
    connection_timeout = min(10.0, CONFIG.request_timeout_s)
    insecure = False

    def on_start(self) -> None:
        self.workload = Workload(
            CONFIG, MODELS, random.Random(CONFIG.seed * 7919 + next(_USER_SEEDS))
        )
        self.headers = (
            {"Authorization": f"Bearer {key}"} if (key := os.environ.get(API_KEY_ENV)) else {}
        )
        self.last_start = time.monotonic()
        interval = self._interval()
        if interval:  # a random first offset keeps paced users from firing together
            gevent.sleep(random.uniform(0, interval))

    def _interval(self) -> float | None:
        """Seconds between this user's requests in a rate stage (its share of the rate)."""
        stage = getattr(self.environment.shape_class, "stage", None)
        if stage is None or stage.rps is None:
            return None
        return stage.user_count / stage.rps

    def wait_time(self) -> float:
        """Closed loop (after the think time) for user stages; paced for rate stages."""
        interval = self._interval()
        if interval is None:
            return CONFIG.think_time_s
        return max(CONFIG.think_time_s, self.last_start + interval - time.monotonic())

    @task
    def send(self) -> None:
        planned = self.workload.next()
        self.last_start = time.monotonic()
        start = time.time()
        if planned.kind is RequestKind.STREAM:
            record = self._stream(planned, start)
        else:
            record = self._unary(planned, start)
        WRITER.write(record.to_json())

    def _unary(self, planned: PlannedRequest, start: float) -> RequestRecord:
        began = time.perf_counter()
        with self._post(planned, stream=False) as response:
            latency_ms = (time.perf_counter() - began) * 1000
            status, tokens = _status(response), None
            if status == OK:
                tokens = _json_tokens(response)
            _mark(response, status)
        return RequestRecord(planned.kind, start, latency_ms, status, output_tokens=tokens)

    def _stream(self, planned: PlannedRequest, start: float) -> RequestRecord:
        began = time.perf_counter()
        tally = StreamTally()
        with self._post(planned, stream=True) as response:
            status = _status(response)
            if status == OK:
                status = _read_stream(response, tally, began)
            else:
                _ = response.content  # drain the error body so the connection can be reused
            _mark(response, status)
        latency_ms = (time.perf_counter() - began) * 1000
        ttft = None if tally.first_token_s is None else round(tally.first_token_s * 1000, 3)
        itl = [round(gap * 1000, 3) for gap in tally.gaps_s]
        return RequestRecord(
            planned.kind, start, latency_ms, status, ttft, itl, tally.output_tokens
        )

    def _post(self, planned: PlannedRequest, stream: bool) -> Any:
        # No redirects: a redirect could lead the load to a host the user never allowed.
        return self.client.post(
            planned.path,
            json=planned.body,
            headers=self.headers,
            name=planned.kind.value,
            stream=stream,
            catch_response=True,
            allow_redirects=False,
        )


def _read_stream(response: FastResponse, tally: StreamTally, began: float) -> str:
    # Lines straight from geventhttpclient's response: FastResponse.iter_content waits for a
    # full block, which would put every token of a short stream at the same instant.
    raw = response._response
    if raw is None:
        return CONNECTION
    try:
        while line := raw.readline(b"\n"):
            tally.feed(line, time.perf_counter() - began)
    except TimeoutError:
        return TIMEOUT
    except Exception:  # a reset or a malformed chunk: the stream ended without [DONE]
        return CONNECTION
    return OK if tally.done and tally.error is None else STREAM_ERROR


def _status(response: FastResponse) -> str:
    code = response.status_code or 0
    if code == 0:
        error = getattr(response, "error", None)
        return TIMEOUT if isinstance(error, TimeoutError) else CONNECTION
    return OK if 200 <= code < 300 else str(code)


def _json_tokens(response: FastResponse) -> int | None:
    try:
        return usage_tokens(response.json())
    except (ValueError, TypeError, AttributeError):
        return None


def _mark(response: Any, status: str) -> None:
    if status == OK:
        response.success()
    else:
        response.failure(status)
