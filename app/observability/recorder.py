"""The process-wide metrics recorder: turns catalogue definitions (app.observability.metrics)
into ray.util.metrics objects, once per process and only on first use, and records through
typed helpers. Every call is a no-op without a Ray connection, because creating a metric would
start a local Ray, and with APP_METRICS=off (a baseline without metrics, for benchmarks); no
failure to create one ever reaches the request that recorded it."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from app.observability.metrics import (
    BATCH_FILL,
    BREAKER_TRANSITIONS,
    COMPLETION_TOKENS,
    FEDERATION_FORWARDS,
    FEDERATION_PEER_AVAILABLE,
    HTTP_REQUEST_DURATION,
    HTTP_REQUESTS,
    KV_CACHE_UTILIZATION,
    KV_OPERATION_DURATION,
    KV_OPERATIONS,
    KV_REPLICATION_LAG,
    PROMPT_TOKENS,
    QUEUE_DEPTH,
    REJECTIONS,
    SLO_P95,
    STREAM_FIRST_TOKEN,
    STREAM_INTER_TOKEN,
    Base,
    ForwardOutcome,
    Kind,
    KVOutcome,
    MetricDef,
    Queue,
    Reason,
)

logger = logging.getLogger(__name__)

# Sampled gauges are set this often: half Ray's default export interval (10 s), so every
# export carries a fresh value (a gauge not set again within an interval disappears).
SAMPLE_PERIOD_S = 5.0

Tags = dict[str, str]
Factory = Callable[[MetricDef], Any]
SampleKey = tuple[str, tuple[tuple[str, str], ...]]  # metric name, sorted tags
METRICS_ENV = "APP_METRICS"  # "off": this process records nothing (app.runtime passes it on)


def create(definition: MetricDef) -> Any:
    """The ray.util.metrics object for a definition (the caller checks Ray is connected)."""
    from ray.util import metrics

    if definition.kind is Kind.COUNTER:
        return metrics.Counter(
            definition.name, description=definition.description, tag_keys=definition.tag_keys
        )
    if definition.kind is Kind.GAUGE:
        return metrics.Gauge(
            definition.name, description=definition.description, tag_keys=definition.tag_keys
        )
    return metrics.Histogram(
        definition.name,
        description=definition.description,
        boundaries=list(definition.boundaries),
        tag_keys=definition.tag_keys,
    )


def ray_connected() -> bool:
    import ray

    return bool(ray.is_initialized())


def metrics_enabled() -> bool:
    """Ray is connected and APP_METRICS is not "off". Read at each check rather than once, so
    the switch is the process environment's as it is now."""
    return os.environ.get(METRICS_ENV, "").lower() != "off" and ray_connected()


class Sampler:
    """Sets registered gauges from their callbacks every `period_s`, on one daemon thread
    started with the first registration. Callbacks run on that thread: they must be cheap and
    read state that is safe to read without the owner's lock (a float, a length)."""

    def __init__(self, period_s: float = SAMPLE_PERIOD_S, *, autostart: bool = True) -> None:
        self.period_s = period_s
        self._autostart = autostart  # False: the caller runs sample_once (tests)
        self._probes: dict[SampleKey, Callable[[], None]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, key: SampleKey, probe: Callable[[], None]) -> None:
        with self._lock:
            self._probes[key] = probe
            if self._thread is None and self._autostart:
                self._thread = threading.Thread(target=self._run, name="app-metrics", daemon=True)
                self._thread.start()

    def remove(self, key: SampleKey) -> None:
        with self._lock:
            self._probes.pop(key, None)

    def sample_once(self) -> None:
        with self._lock:
            probes = list(self._probes.items())
        for key, probe in probes:
            try:
                probe()
            except Exception:  # one bad callback must not stop the others
                logger.exception("metric sample %s failed; dropping it", key[0])
                self.remove(key)

    def _run(self) -> None:  # lives as long as the process (a daemon thread)
        while True:
            time.sleep(self.period_s)
            self.sample_once()


class EngineFigures(Protocol):
    """What sample_engine reads (app.serving.engines.EngineStats has these)."""

    @property
    def queued(self) -> int: ...

    @property
    def kv_cache_utilization(self) -> float | None: ...


class Recorder:
    """Creates each metric on first use and records it. `enabled` and `factory` are injected
    so tests can record without Ray."""

    def __init__(
        self,
        enabled: Callable[[], bool] = metrics_enabled,
        factory: Factory = create,
        sampler: Sampler | None = None,
    ) -> None:
        self._enabled = enabled
        self._factory = factory
        self._metrics: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.sampler = sampler or Sampler()

    def metric(self, definition: MetricDef) -> Any | None:
        """The metric object, or None while Ray is not connected (or it could not be made)."""
        found = self._metrics.get(definition.name)
        if found is not None:
            return found
        try:
            if not self._enabled():
                return None
            with self._lock:
                if definition.name not in self._metrics:
                    self._metrics[definition.name] = self._factory(definition)
                return self._metrics[definition.name]
        except Exception:  # metrics need a connected worker; requests must not depend on them
            logger.warning("metric %s unavailable", definition.name, exc_info=True)
            return None

    # ---- the three operations; tags must name every tag key of the definition ----------------

    def inc(self, definition: MetricDef, tags: Tags, value: float = 1.0) -> None:
        metric = self.metric(definition)
        if metric is not None and value > 0:
            metric.inc(value, tags)

    def set(self, definition: MetricDef, tags: Tags, value: float) -> None:
        metric = self.metric(definition)
        if metric is not None:
            metric.set(value, tags)

    def observe(self, definition: MetricDef, tags: Tags, value: float) -> None:
        metric = self.metric(definition)
        if metric is not None:
            metric.observe(value, tags)

    def sample(
        self, definition: MetricDef, tags: Tags, read: Callable[[], float]
    ) -> Callable[[], None]:
        """Set the gauge to `read()` every sampler period from now on; returns the function
        that stops it. A no-op (returning a no-op) without Ray."""
        if self.metric(definition) is None:
            return lambda: None
        key: SampleKey = (definition.name, tuple(sorted(tags.items())))
        self.sampler.add(key, lambda: self.set(definition, tags, float(read())))
        return lambda: self.sampler.remove(key)

    # ---- typed helpers: one per event the service records -----------------------------------

    def observe_request(
        self, model: str, region: str, base: Base, status: int, seconds: float, *, stream: bool
    ) -> None:
        """One answered HTTP inference request. `model` must be a catalogue id (or "other"),
        never the client's string as sent: each value is a series for as long as Ray runs."""
        tags = {"model": model, "region": region, "base": str(base)}
        self.inc(HTTP_REQUESTS, tags | {"status": str(status)})
        self.observe(HTTP_REQUEST_DURATION, tags | {"stream": str(stream).lower()}, seconds)

    def observe_first_token(self, model: str, region: str, base: Base, seconds: float) -> None:
        self.observe(STREAM_FIRST_TOKEN, _http(model, region, base), seconds)

    def observe_inter_token(self, model: str, region: str, base: Base, seconds: float) -> None:
        self.observe(STREAM_INTER_TOKEN, _http(model, region, base), seconds)

    def count_tokens(self, model: str, region: str, prompt: int, completion: int) -> None:
        tags = {"model": model, "region": region}
        self.inc(PROMPT_TOKENS, tags, prompt)
        self.inc(COMPLETION_TOKENS, tags, completion)

    def reject(self, model: str, region: str, base: Base, reason: Reason) -> None:
        self.inc(REJECTIONS, _http(model, region, base) | {"reason": str(reason)})

    def set_batch_fill(self, model: str, region: str, replica: str, fill: float) -> None:
        self.set(BATCH_FILL, {"model": model, "region": region, "replica": replica}, fill)

    def sample_queue_depth(
        self, model: str, region: str, queue: Queue, replica: str, read: Callable[[], float]
    ) -> Callable[[], None]:
        tags = {"model": model, "region": region, "queue": str(queue), "replica": replica}
        return self.sample(QUEUE_DEPTH, tags, read)

    def sample_engine(
        self, model: str, region: str, replica: str, stats: Callable[[], EngineFigures]
    ) -> Callable[[], None]:
        """A text-generation engine's queue and KV cache use, sampled; returns the stop."""
        tags = {"model": model, "region": region, "replica": replica}
        stops = [
            self.sample_queue_depth(model, region, Queue.BATCH, replica, lambda: stats().queued),
            self.sample(KV_CACHE_UTILIZATION, tags, lambda: stats().kv_cache_utilization or 0.0),
        ]

        def stop_all() -> None:
            for stop in stops:
                stop()

        return stop_all

    def sample_slo(
        self, model: str, region: str, p95_seconds: Callable[[], float]
    ) -> Callable[[], None]:
        return self.sample(SLO_P95, {"model": model, "region": region}, p95_seconds)

    def breaker_transition(
        self, region: str, state: str, *, model: str = "", peer: str = ""
    ) -> None:
        tags = {"region": region, "model": model, "peer": peer, "state": state}
        self.inc(BREAKER_TRANSITIONS, tags)

    def observe_kv(self, store: str, op: str, outcome: KVOutcome, seconds: float) -> None:
        self.inc(KV_OPERATIONS, {"store": store, "op": op, "outcome": str(outcome)})
        self.observe(KV_OPERATION_DURATION, {"store": store, "op": op}, seconds)

    def sample_replication_lag(
        self, store: str, group: int, member: str, seconds: Callable[[], float]
    ) -> Callable[[], None]:
        tags = {"store": store, "group": str(group), "member": member}
        return self.sample(KV_REPLICATION_LAG, tags, seconds)

    def count_forward(self, model: str, region: str, peer: str, outcome: ForwardOutcome) -> None:
        tags = {"model": model, "region": region, "peer": peer, "outcome": str(outcome)}
        self.inc(FEDERATION_FORWARDS, tags)

    def sample_peer_available(
        self, region: str, peer: str, available: Callable[[], bool]
    ) -> Callable[[], None]:
        tags = {"region": region, "peer": peer}
        return self.sample(FEDERATION_PEER_AVAILABLE, tags, lambda: float(available()))


def _http(model: str, region: str, base: Base) -> Tags:
    return {"model": model, "region": region, "base": str(base)}


_recorder: Recorder | None = None
_recorder_lock = threading.Lock()


def metrics() -> Recorder:
    """This process's recorder."""
    global _recorder
    if _recorder is None:
        with _recorder_lock:
            if _recorder is None:
                _recorder = Recorder()
    return _recorder
