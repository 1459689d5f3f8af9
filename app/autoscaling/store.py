"""The autoscaler's memory in the KV store: request counts per minute (a `RateHistory`), a bounded
decision log and the latest status of each model and region, kept in memory while the store is
unreachable and written through, off the Serve controller's event loop, once it answers."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.kv.client import KVClient, ScanPage
from app.kv.errors import KVUnavailableError

logger = logging.getLogger(__name__)

PREFIX = "autoscale"
STATUS_PREFIX = f"{PREFIX}:status:"
# One key per hour of counts: a minute's append rewrites at most 60 counts, and the four days a
# forecast reads are about 100 keys, one mget.
MINUTES_PER_KEY = 60
DEFAULT_RETENTION_MINUTES = 8 * 1440
DEFAULT_LOG_SIZE = 100
LOG_TTL_S = 7 * 86_400.0
# A status outlives a controller restart (its timings seed the new policy) but not a model
# that has gone for a day.
STATUS_TTL_S = 86_400.0
RETRY_S = 30.0

Series = tuple[str, str]  # (model, region)


def rate_key(model: str, region: str, hour: int) -> str:
    """{minute: count} for the 60 minutes of epoch hour `hour`."""
    return f"{PREFIX}:rate:{model}:{region}:{hour}"


def log_key(model: str, region: str, slot: int | str) -> str:
    """Slot `seq % size` of the decision ring, or its head {"seq": last, "size": size}."""
    return f"{PREFIX}:log:{model}:{region}:{slot}"


def status_key(model: str, region: str) -> str:
    return f"{STATUS_PREFIX}{model}:{region}"


class KVStoreClient(Protocol):
    """What the store uses of app.kv's KVClient (which satisfies it)."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def mget(self, keys: Iterable[str], default: Any = None) -> list[Any]: ...

    def mset(self, mapping: Mapping[str, Any], *, ttl: float | None = None) -> None: ...

    def scan(
        self, prefix: str = "", *, page_size: int = 100, cursor: str | None = None
    ) -> ScanPage: ...


def kv_connector(name: str = "kv", namespace: str = "app-kv") -> Callable[[], KVStoreClient]:
    """Connects to the named KV cluster from inside the Ray cluster (the Serve controller)."""

    def connect() -> KVStoreClient:
        import ray

        if not ray.is_initialized():  # asking would start a Ray instance of its own
            raise KVUnavailableError("this process is not connected to a Ray cluster")
        return KVClient.connect(name, namespace)

    return connect


def read_log(client: KVStoreClient, model: str, region: str, limit: int) -> list[dict[str, Any]]:
    """The last `limit` decisions of one series, oldest first."""
    head = client.get(log_key(model, region, "head"))
    if not isinstance(head, dict) or limit <= 0:
        return []
    last, size = int(head["seq"]), int(head["size"])
    seqs = range(max(0, last - min(limit, size) + 1), last + 1)
    entries = client.mget([log_key(model, region, seq % size) for seq in seqs])
    # A slot holds an older lap's entry when the newer write was lost: skip it.
    return [
        e for seq, e in zip(seqs, entries, strict=True) if isinstance(e, dict) and e["seq"] == seq
    ]


def scan_all(client: KVStoreClient, prefix: str) -> Iterator[tuple[str, Any]]:
    cursor: str | None = None
    while True:
        page = client.scan(prefix, page_size=100, cursor=cursor)
        yield from page.items
        if page.cursor is None:
            return
        cursor = page.cursor


def read_summaries(client: KVStoreClient, decisions: int = 5) -> list[dict[str, Any]]:
    """Every series' latest status with its last `decisions` decisions (`app autoscale status`)."""
    rows = [dict(v) for _, v in scan_all(client, STATUS_PREFIX) if isinstance(v, dict)]
    for row in rows:
        row["decisions"] = read_log(client, row["model"], row["region"], decisions)
    return sorted(rows, key=lambda r: (r["model"], r["region"]))


@dataclass
class _Series:
    """One model-and-region's memory; `pending` entries and dirty parts are not written yet."""

    log: deque[dict[str, Any]]
    counts: dict[int, int] = field(default_factory=dict)
    dirty_hours: set[int] = field(default_factory=set)
    pending: list[dict[str, Any]] = field(default_factory=list)
    head: int = -1  # seq of the last decision written to the store
    status: dict[str, Any] | None = None
    status_dirty: bool = False
    restored: dict[str, Any] | None = None  # the status a previous process left in the store
    loaded: bool = False  # what the store held has been read back


class AutoscaleStore:
    """A RateHistory plus a decision log and status board, one per model and region.

    Reads are served from memory; what the KV store held is read back once per series, and
    changes are written by `flush`, on a background thread unless `background` is False (then
    each change flushes at once: tests). While the store cannot be reached everything stays in
    memory (a warning, once per outage) and is written through when it answers again."""

    def __init__(
        self,
        connect: Callable[[], KVStoreClient],
        *,
        clock: Callable[[], float] = time.time,
        retention_minutes: int = DEFAULT_RETENTION_MINUTES,
        log_size: int = DEFAULT_LOG_SIZE,
        retry_s: float = RETRY_S,
        background: bool = True,
    ) -> None:
        self.retention_minutes = retention_minutes
        self.log_size = log_size
        self.retry_s = retry_s
        self._connect = connect
        self._clock = clock
        self._background = background
        self._lock = threading.Lock()  # memory, shared with the policy's thread
        self._io = threading.Lock()  # one flush at a time
        self._series: dict[Series, _Series] = {}
        self._client: KVStoreClient | None = None
        self._next_connect_s = 0.0
        self._warned = False
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def backend(self) -> str:
        return "memory" if self._client is None else "kv"

    # RateHistory ------------------------------------------------------------------------
    def append(self, model: str, region: str, minute: int, count: int) -> None:
        with self._lock:
            series = self._get((model, region))
            series.counts[minute] = int(count)
            series.dirty_hours.add(minute // MINUTES_PER_KEY)
            cutoff = max(series.counts) - self.retention_minutes
            for old in [m for m in series.counts if m <= cutoff]:
                del series.counts[old]
        self._kick()

    def load(self, model: str, region: str, since: int) -> list[tuple[int, int]]:
        series = self._reading((model, region))
        with self._lock:
            return sorted((m, c) for m, c in series.counts.items() if m >= since)

    # Decision log and status ------------------------------------------------------------
    def record(self, model: str, region: str, entry: dict[str, Any]) -> None:
        with self._lock:
            series = self._get((model, region))
            series.log.append(entry)
            series.pending.append(entry)
            del series.pending[: -self.log_size]
        self._kick()

    def set_status(self, model: str, region: str, status: dict[str, Any]) -> None:
        with self._lock:
            series = self._get((model, region))
            series.status, series.status_dirty = status, True
        self._kick()

    def recent(self, model: str, region: str, limit: int) -> list[dict[str, Any]]:
        series = self._reading((model, region))
        with self._lock:
            return list(series.log)[-limit:] if limit > 0 else []

    def status(self, model: str, region: str) -> dict[str, Any] | None:
        """The latest status: this process's, else the one a previous process left."""
        series = self._reading((model, region))
        return series.status or series.restored

    def restored_status(self, model: str, region: str) -> dict[str, Any] | None:
        """The status the store held when this process first read the series back (None until
        then, or when it held none), whatever this process has written since."""
        return self._reading((model, region)).restored

    def loaded(self, model: str, region: str) -> bool:
        """Whether what the KV store held for this series has been read back."""
        return self._reading((model, region)).loaded

    # Writing through ----------------------------------------------------------------------
    def flush(self) -> bool:
        """Connect if due, read back series not read yet, write every change. True when the
        KV store has everything; False leaves the changes in memory for the next flush."""
        with self._io:
            client = self._client or self._reconnect()
            if client is None:
                return False
            try:
                for key in self._unloaded():
                    self._read_back(client, key)
                self._write(client)
            except Exception as exc:
                self._lost(exc)
                return False
            return True

    def _reading(self, key: Series) -> _Series:
        """The series, its read-back asked for first if it is not done (done by the time this
        returns without the background thread)."""
        with self._lock:
            series = self._get(key)
        if not series.loaded:
            self._kick()
        return series

    def _kick(self) -> None:
        if not self._background:
            self.flush()
            return
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="autoscale-store", daemon=True
                    )
                    self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(timeout=self.retry_s)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # the thread must outlive any one failure
                logger.exception("autoscaling store: flush failed")

    def _reconnect(self) -> KVStoreClient | None:
        now = self._clock()
        if now < self._next_connect_s:
            return None
        try:
            self._client = self._connect()
        except Exception as exc:
            self._next_connect_s = now + self.retry_s
            self._warn(
                f"KV store unreachable ({exc}); autoscaling history and decisions stay in "
                "memory until it answers (lost if the controller restarts first)"
            )
            return None
        if self._warned:
            logger.info("autoscaling store: KV store reached; writing through")
        self._warned = False
        return self._client

    def _lost(self, exc: Exception) -> None:
        self._client = None
        self._next_connect_s = self._clock() + self.retry_s
        self._warn(f"KV store failed ({type(exc).__name__}: {exc}); keeping changes in memory")

    def _warn(self, message: str) -> None:
        if not self._warned:
            logger.warning("autoscaling store: %s", message)
            self._warned = True

    def _get(self, key: Series) -> _Series:
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(log=deque(maxlen=self.log_size))
        return series

    def _unloaded(self) -> list[Series]:
        with self._lock:
            return [key for key, series in self._series.items() if not series.loaded]

    def _read_back(self, client: KVStoreClient, key: Series) -> None:
        model, region = key
        now_minute = int(self._clock() // 60)
        hours = range(
            (now_minute - self.retention_minutes) // MINUTES_PER_KEY,
            now_minute // MINUTES_PER_KEY + 1,
        )
        *rates, status = client.mget(
            [*(rate_key(model, region, h) for h in hours), status_key(model, region)]
        )
        head = client.get(log_key(model, region, "head"))
        entries = read_log(client, model, region, self.log_size)
        with self._lock:
            series = self._series[key]
            for stored in rates:
                for minute, count in (stored or {}).items():
                    series.counts.setdefault(int(minute), int(count))  # this process's win
            series.restored = status if isinstance(status, dict) else None
            series.head = int(head["seq"]) if isinstance(head, dict) else -1
            series.log = deque([*entries, *series.pending], maxlen=self.log_size)
            series.loaded = True

    def _write(self, client: KVStoreClient) -> None:
        rates, log, statuses, taken = self._take()
        try:
            if rates:
                client.mset(rates, ttl=self.retention_minutes * 60.0)
            if log:
                client.mset(log, ttl=LOG_TTL_S)
            if statuses:
                client.mset(statuses, ttl=STATUS_TTL_S)
        except Exception:
            self._give_back(taken)
            raise
        with self._lock:
            for key, (_, pending, status) in taken.items():
                series = self._series[key]
                written = {id(entry) for entry in pending}
                series.pending = [e for e in series.pending if id(e) not in written]
                if status is not None and series.status is status:
                    series.status_dirty = False

    def _take(
        self,
    ) -> tuple[
        dict[str, Any],
        dict[str, Any],
        dict[str, Any],
        dict[Series, tuple[set[int], list[dict[str, Any]], dict[str, Any] | None]],
    ]:
        """Everything to write, under the lock; dirty hours are cleared (given back on failure)
        and pending decisions get their sequence numbers (kept: a retry rewrites the same)."""
        rates: dict[str, Any] = {}
        log: dict[str, Any] = {}
        statuses: dict[str, Any] = {}
        taken: dict[Series, tuple[set[int], list[dict[str, Any]], dict[str, Any] | None]] = {}
        with self._lock:
            for (model, region), series in self._series.items():
                if not series.loaded:  # written over, the store's older data would be lost
                    continue
                hours, series.dirty_hours = series.dirty_hours, set()
                for hour in hours:
                    first = hour * MINUTES_PER_KEY
                    rates[rate_key(model, region, hour)] = {
                        m: c for m, c in series.counts.items() if first <= m < first + 60
                    }
                for i, entry in enumerate(series.pending):
                    if "seq" not in entry:
                        series.head += 1
                        series.pending[i] = entry = {**entry, "seq": series.head}
                    log[log_key(model, region, entry["seq"] % self.log_size)] = entry
                if series.pending:
                    head = {"seq": series.pending[-1]["seq"], "size": self.log_size}
                    log[log_key(model, region, "head")] = head
                status = series.status if series.status_dirty else None
                if status is not None:
                    statuses[status_key(model, region)] = status
                taken[(model, region)] = (hours, list(series.pending), status)
        return rates, log, statuses, taken

    def _give_back(
        self, taken: dict[Series, tuple[set[int], list[dict[str, Any]], dict[str, Any] | None]]
    ) -> None:
        with self._lock:
            for key, (hours, _, _) in taken.items():
                self._series[key].dirty_hours |= hours


_shared: dict[tuple[str, str], AutoscaleStore] = {}
_shared_lock = threading.Lock()


def shared_store(name: str = "kv", namespace: str = "app-kv") -> AutoscaleStore:
    """The process's store for one KV cluster: every deployment's policy on a controller
    shares it (and its one connection and thread)."""
    with _shared_lock:
        store = _shared.get((name, namespace))
        if store is None:
            store = _shared[(name, namespace)] = AutoscaleStore(kv_connector(name, namespace))
        return store
