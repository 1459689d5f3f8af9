"""KVClient: the store's public API, with synchronous methods and `a`-prefixed asyncio twins."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import ray

from app.kv import protocol
from app.kv.client_async import AsyncKVCalls, ScanPage
from app.kv.config import KVConfig, ReadConcern, WriteConcern, read_code, write_code
from app.kv.direct import AsyncDirectClient, DirectClient
from app.kv.errors import ClusterNotFoundError, InvalidArgumentError
from app.kv.frames import max_frame_bytes
from app.kv.pipeline import ReadMany, ReadPipeline
from app.kv.protocol import Call, MapView
from app.kv.routing import Backoff, Op, Router
from app.kv.slots import key_slot
from app.observability.metrics import KVOutcome
from app.observability.recorder import metrics
from app.observability.tracing import span


def coordinator_handle(name: str, namespace: str) -> Any:
    """The named coordinator actor of a KV cluster; ClusterNotFoundError if there is none."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        raise ClusterNotFoundError(
            f"no KV cluster named {name!r} in namespace {namespace!r}"
        ) from None


def _with_direct(config: KVConfig, direct: bool | None) -> KVConfig:
    if direct is None or direct == config.direct_transport:
        return config
    return config.model_copy(update={"direct_transport": bool(direct and config.direct_transport)})


class KVClient(AsyncKVCalls):
    """Talks to shard primaries directly, using the slot map it caches from the coordinator.

    Usable from a driver, a task, an actor or a Serve replica (use the `a...` methods inside
    async code). Cheap to keep for the life of the process; it pickles as (name, namespace).
    """

    def __init__(self, coordinator: Any, config: KVConfig, view: MapView) -> None:
        self._coordinator = coordinator
        self.config = config
        self._router = Router(coordinator, config, view)
        self._read = read_code(config.read_concern)
        self._write = write_code(config.write_concern)
        self._rid_prefix = uuid.uuid4().hex[:16] + ":"
        self._rids = itertools.count()
        # Calls to shard members go over the direct transport when the cluster offers it
        # (app.kv.direct): one blocking client for the synchronous methods, one per event
        # loop for the asyncio ones (their connections belong to that loop).
        self._call_timeout = config.write_timeout_s + config.health_check_timeout_s
        self._max_frame = max_frame_bytes(config.max_value_bytes)
        self._direct = (
            DirectClient(self._call_timeout, max_frame=self._max_frame)
            if config.direct_transport
            else None
        )
        self._adirect: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncDirectClient] = (
            weakref.WeakKeyDictionary()
        )
        # One auto-pipelining state per event loop (its futures belong to that loop).
        self._pipelines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ReadPipeline] = (
            weakref.WeakKeyDictionary()
        )

    # Connecting --------------------------------------------------------------------------
    @classmethod
    def connect(
        cls, name: str = "kv", namespace: str = "app-kv", *, direct: bool | None = None
    ) -> KVClient:
        """A client of the named cluster. `direct=False` keeps this client on Ray actor calls
        even where the cluster offers the direct transport (None: the cluster's setting)."""
        coordinator = coordinator_handle(name, namespace)
        config, view = ray.get([coordinator.config.remote(), coordinator.get_map.remote()])
        return cls(coordinator, _with_direct(config, direct), view)

    @classmethod
    async def aconnect(
        cls, name: str = "kv", namespace: str = "app-kv", *, direct: bool | None = None
    ) -> KVClient:
        coordinator = coordinator_handle(name, namespace)
        config = await coordinator.config.remote()
        view = await coordinator.get_map.remote()
        return cls(coordinator, _with_direct(config, direct), view)

    def __reduce__(self) -> tuple[Any, tuple[str, str, bool | None]]:
        # A client opted out of the direct transport stays out where it is unpickled.
        direct = None if self.config.direct_transport else False
        return (_reconnect, (self.config.name, self.config.namespace, direct))

    # Drivers: run a routing generator to completion --------------------------------------
    # No per-call timeout: it costs ~10% of a call in Ray, and a member that stops answering
    # is the coordinator's to detect (health checks), after which the call fails and retries.
    def _run(self, op: Op) -> Any:
        """Drive `op`, timed and counted by its name (get, put, ...) in the KV metrics, in a
        span of the current trace."""
        started, outcome = time.perf_counter(), KVOutcome.ERROR
        try:
            with span(f"kv.{_op_name(op)}"):
                result = self._drive(op)
            outcome = KVOutcome.OK
            return result
        finally:
            self._observe(op, outcome, started)

    async def _arun(self, op: Op) -> Any:
        started, outcome = time.perf_counter(), KVOutcome.ERROR
        try:
            with span(f"kv.{_op_name(op)}"):
                result = await self._adrive(op)
            outcome = KVOutcome.OK
            return result
        finally:
            self._observe(op, outcome, started)

    def _observe(self, op: Op, outcome: KVOutcome, started: float) -> None:
        elapsed = time.perf_counter() - started
        metrics().observe_kv(self.config.name, _op_name(op), outcome, elapsed)

    def _drive(self, op: Op) -> Any:
        direct = self._direct
        try:
            request = next(op)
            while True:
                try:
                    if type(request) is Call:
                        result = (
                            ray.get(request.submit()) if direct is None else direct.call(request)
                        )
                    elif type(request) is Backoff:
                        time.sleep(request.seconds)
                        result = None
                    elif type(request) is list:
                        calls: list[Any] = [
                            Call(r.primary, "mget", (r.keys,)) if type(r) is ReadMany else r
                            for r in request
                        ]
                        result = (
                            ray.get([c.submit() if type(c) is Call else c for c in calls])
                            if direct is None
                            else direct.call_many(calls)
                        )
                    else:
                        result = ray.get(request)
                except Exception as exc:
                    request = op.throw(exc)
                    continue
                request = op.send(result)
        except StopIteration as stop:
            return stop.value

    async def _adrive(self, op: Op) -> Any:
        try:
            request = next(op)
            while True:
                try:
                    if type(request) is Backoff:
                        await asyncio.sleep(request.seconds)
                        result = None
                    elif type(request) is list:
                        pipeline = self._pipeline()
                        result = await asyncio.gather(
                            *(
                                pipeline.read(r)
                                if type(r) is ReadMany
                                else self._acall(r)
                                if type(r) is Call
                                else r
                                for r in request
                            )
                        )
                    elif type(request) is Call:
                        result = await self._acall(request)
                    else:
                        result = await request
                except Exception as exc:
                    request = op.throw(exc)
                    continue
                request = op.send(result)
        except StopIteration as stop:
            return stop.value

    def _acall(self, call: Call) -> Any:
        """The awaitable reply to `call` in the running loop."""
        if not (call.direct and self.config.direct_transport):
            return call.submit()
        loop = asyncio.get_running_loop()
        direct = self._adirect.get(loop)
        if direct is None:
            # Each client's connections hold their loop, so the weak key never dies on its
            # own: the clients of loops closed since (each asyncio.run) are closed here.
            for old in [old for old in self._adirect if old.is_closed()]:
                self._adirect.pop(old).close()
            direct = self._adirect[loop] = AsyncDirectClient(
                self._call_timeout, max_frame=self._max_frame
            )
        return direct.call(call)

    async def _amget(self, primary: Any, keys: list[str]) -> list[Any]:
        reply: list[Any] = await self._acall(Call(primary, "mget", (keys,)))
        return reply

    def _pipeline(self) -> ReadPipeline:
        loop = asyncio.get_running_loop()
        pipeline = self._pipelines.get(loop)
        if pipeline is None:
            pipeline = self._pipelines[loop] = ReadPipeline(mget=self._amget)
        return pipeline

    # Argument checks ---------------------------------------------------------------------
    def _read_args(
        self, read: ReadConcern | str | None, max_lag_ms: float | None
    ) -> tuple[int, float]:
        if read is None and max_lag_ms is None:
            code = self._read
        elif read is None:
            code = protocol.READ_BOUNDED
        else:
            code = read_code(read)
        if code == protocol.READ_EVENTUAL:
            return code, -1.0
        if code == protocol.READ_BOUNDED:
            lag = self.config.max_lag_ms if max_lag_ms is None else max_lag_ms
            if isinstance(lag, bool) or not isinstance(lag, int | float) or lag <= 0:
                raise InvalidArgumentError(f"max_lag_ms must be a positive number, not {lag!r}")
            return code, float(lag)
        return code, 0.0

    def _write_args(
        self, write: WriteConcern | str | None, request_id: str | None
    ) -> tuple[int, str]:
        code = self._write if write is None else write_code(write)
        if request_id is None:
            return code, f"{self._rid_prefix}{next(self._rids)}"
        if not isinstance(request_id, str) or not request_id:
            raise InvalidArgumentError("request_id must be a non-empty str")
        return code, request_id

    @staticmethod
    def _ttl(ttl: float | None) -> float | None:
        if ttl is None:
            return None
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
            raise InvalidArgumentError(f"ttl must be a positive number of seconds, not {ttl!r}")
        return float(ttl)

    def _page(self, page_size: int) -> int:
        if (
            isinstance(page_size, bool)
            or not isinstance(page_size, int)
            or not (1 <= page_size <= self.config.max_page_size)
        ):
            raise InvalidArgumentError(
                f"page_size must be an int in 1..{self.config.max_page_size}, not {page_size!r}"
            )
        return page_size

    @staticmethod
    def _keys(keys: Iterable[str]) -> list[str]:
        if isinstance(keys, str | bytes):
            raise InvalidArgumentError("mget takes a list of keys, not a single key")
        return list(keys)

    @staticmethod
    def _mapping(mapping: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(mapping, Mapping):
            raise InvalidArgumentError(f"mset takes a mapping, not {type(mapping).__name__}")
        return dict(mapping)

    @staticmethod
    def _expected(expected: int | None) -> int | None:
        if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int)):
            raise InvalidArgumentError(f"expected_version must be an int or None, not {expected!r}")
        return expected

    # Operations (each has an asyncio twin below) -----------------------------------------
    def _get(self, key: str, default: Any, read: Any, max_lag_ms: float | None) -> Op:
        return self._router.get(key, default, *self._read_args(read, max_lag_ms))

    def _put(self, key: str, value: Any, ttl: Any, write: Any, request_id: Any) -> Op:
        code, rid = self._write_args(write, request_id)
        return self._router.put(key, value, self._ttl(ttl), code, rid)

    def _cas(self, key: str, expected: Any, value: Any, ttl: Any, write: Any, rid: Any) -> Op:
        code, rid = self._write_args(write, rid)
        return self._router.cas(key, self._expected(expected), value, self._ttl(ttl), code, rid)

    def _mget(self, keys: Iterable[str], default: Any, read: Any, max_lag_ms: Any) -> Op:
        return self._router.mget(self._keys(keys), default, *self._read_args(read, max_lag_ms))

    def _mset(self, mapping: Mapping[str, Any], ttl: Any, write: Any, request_id: Any) -> Op:
        code, rid = self._write_args(write, request_id)
        return self._router.mset(self._mapping(mapping), self._ttl(ttl), code, rid)

    def _scan(self, prefix: str, page_size: int, cursor: str | None) -> Op:
        if not isinstance(prefix, str):
            raise InvalidArgumentError(f"prefix must be a str, not {type(prefix).__name__}")
        return self._router.scan(prefix, self._page(page_size), cursor)

    def get(
        self,
        key: str,
        default: Any = None,
        *,
        read: ReadConcern | str | None = None,
        max_lag_ms: float | None = None,
    ) -> Any:
        """The value of `key`, or `default`. `max_lag_ms` alone means a bounded read."""
        return self._run(self._get(key, default, read, max_lag_ms))

    def get_versioned(self, key: str) -> tuple[Any, int] | None:
        """(value, version) of `key` from its primary, or None; versions feed `cas`."""
        return self._run(self._router.get_versioned(key))

    def put(
        self,
        key: str,
        value: Any,
        *,
        ttl: float | None = None,
        write: WriteConcern | str | None = None,
        request_id: str | None = None,
    ) -> int:
        """Store `value` (expiring after `ttl` seconds); returns its new version."""
        return int(self._run(self._put(key, value, ttl, write, request_id)))

    def delete(
        self, key: str, *, write: WriteConcern | str | None = None, request_id: str | None = None
    ) -> bool:
        """Remove `key`; True if it existed."""
        code, rid = self._write_args(write, request_id)
        return bool(self._run(self._router.delete(key, code, rid)))

    def cas(
        self,
        key: str,
        expected_version: int | None,
        value: Any,
        *,
        ttl: float | None = None,
        write: WriteConcern | str | None = None,
        request_id: str | None = None,
    ) -> tuple[bool, int | None]:
        """Store `value` only if the key's version is `expected_version` (None: key absent).
        Returns (True, new version) or (False, current version)."""
        reply = self._run(self._cas(key, expected_version, value, ttl, write, request_id))
        return bool(reply[0]), reply[1]

    def mget(
        self,
        keys: Iterable[str],
        default: Any = None,
        *,
        read: ReadConcern | str | None = None,
        max_lag_ms: float | None = None,
    ) -> list[Any]:
        """Values of `keys` in order (`default` for missing ones), one call per shard group."""
        return self._run(self._mget(keys, default, read, max_lag_ms))

    def mset(
        self,
        mapping: Mapping[str, Any],
        *,
        ttl: float | None = None,
        write: WriteConcern | str | None = None,
        request_id: str | None = None,
    ) -> None:
        """Store every item of `mapping`, one call per shard group."""
        self._run(self._mset(mapping, ttl, write, request_id))

    def scan(
        self, prefix: str = "", *, page_size: int = 100, cursor: str | None = None
    ) -> ScanPage:
        """One page of keys starting with `prefix`, in slot order; never an unbounded read."""
        items, nxt = self._run(self._scan(prefix, page_size, cursor))
        return ScanPage(items, nxt)

    def scan_iter(self, prefix: str = "", *, page_size: int = 100) -> Iterator[tuple[str, Any]]:
        """Every (key, value) with `prefix`, fetched a page at a time."""
        cursor: str | None = None
        while True:
            page = self.scan(prefix, page_size=page_size, cursor=cursor)
            yield from page.items
            if page.cursor is None:
                return
            cursor = page.cursor

    # Connections ------------------------------------------------------------------------
    def transport_stats(self) -> dict[str, int]:
        """Calls this client sent over the direct transport, and connection failures after
        which a call went through Ray instead."""
        books = [*([self._direct] if self._direct is not None else []), *self._adirect.values()]
        return {
            "direct_calls": sum(book.calls for book in books),
            "fallbacks": sum(book.fallbacks for book in books),
        }

    def close(self) -> None:
        """Close the direct connections now (they also close when the client is collected).
        Call it from the event loop thread when asyncio methods were used."""
        if self._direct is not None:
            self._direct.close()
        for direct in list(self._adirect.values()):
            direct.close()

    # Administration (through the coordinator, never on the data path) ---------------------
    def refresh(self) -> None:
        """Reload the slot map now (normally it reloads itself when redirected)."""
        self._run(self._router.reload())

    def group_of(self, key: str | int) -> int:
        """The shard group that owns a key (or a slot number) in this client's cached map."""
        slot = key if isinstance(key, int) else key_slot(key, self.config.max_key_bytes)
        return self._router.owners[slot]

    def status(self) -> dict[str, Any]:
        return ray.get(self._coordinator.status.remote())

    def rebalance(self) -> list[dict[str, Any]]:
        return ray.get(self._coordinator.rebalance.remote())

    def split(self, gid: int | None = None) -> dict[str, Any]:
        return ray.get(self._coordinator.split.remote(gid))

    def move_slots(self, slots: list[int], target: int) -> int:
        return int(ray.get(self._coordinator.move_slots.remote(list(slots), target)))


def _reconnect(name: str, namespace: str, direct: bool | None) -> KVClient:
    return KVClient.connect(name, namespace, direct=direct)


def _op_name(op: Op) -> str:
    """The operation a routing generator performs: its function's name (get, put, cas...)."""
    return getattr(op, "__name__", "op")
