"""The KV client's calls for callers on an event loop (aget, aput, acas, ...): the same
operations as KVClient's blocking ones, driven without blocking the loop. A mixin of KVClient,
which supplies the operations and the driver."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from app.kv.config import ReadConcern, WriteConcern
from app.kv.routing import Op, Router


@dataclass(frozen=True)
class ScanPage:
    """One page of a prefix scan; pass `cursor` back for the next page (None: no more)."""

    items: list[tuple[str, Any]]
    cursor: str | None


class AsyncKVCalls:
    """Needs, from the class it is mixed into: the router, the operation builders and the
    async driver (`_arun`)."""

    _router: Router

    async def _arun(self, op: Op) -> Any:
        raise NotImplementedError

    def _get(self, key: str, default: Any, read: Any, max_lag_ms: float | None) -> Op:
        raise NotImplementedError

    def _put(self, key: str, value: Any, ttl: Any, write: Any, request_id: Any) -> Op:
        raise NotImplementedError

    def _cas(self, key: str, expected: Any, value: Any, ttl: Any, write: Any, rid: Any) -> Op:
        raise NotImplementedError

    def _mget(self, keys: Iterable[str], default: Any, read: Any, max_lag_ms: Any) -> Op:
        raise NotImplementedError

    def _mset(self, mapping: Mapping[str, Any], ttl: Any, write: Any, request_id: Any) -> Op:
        raise NotImplementedError

    def _scan(self, prefix: str, page_size: int, cursor: str | None) -> Op:
        raise NotImplementedError

    def _write_args(self, write: Any, request_id: str | None) -> tuple[int, str]:
        raise NotImplementedError

    async def aget(
        self,
        key: str,
        default: Any = None,
        *,
        read: ReadConcern | str | None = None,
        max_lag_ms: float | None = None,
    ) -> Any:
        return await self._arun(self._get(key, default, read, max_lag_ms))

    async def aget_versioned(self, key: str) -> tuple[Any, int] | None:
        return await self._arun(self._router.get_versioned(key))

    async def aput(
        self,
        key: str,
        value: Any,
        *,
        ttl: float | None = None,
        write: WriteConcern | str | None = None,
        request_id: str | None = None,
    ) -> int:
        return int(await self._arun(self._put(key, value, ttl, write, request_id)))

    async def adelete(
        self, key: str, *, write: WriteConcern | str | None = None, request_id: str | None = None
    ) -> bool:
        code, rid = self._write_args(write, request_id)
        return bool(await self._arun(self._router.delete(key, code, rid)))

    async def acas(
        self,
        key: str,
        expected_version: int | None,
        value: Any,
        *,
        ttl: float | None = None,
        write: WriteConcern | str | None = None,
        request_id: str | None = None,
    ) -> tuple[bool, int | None]:
        reply = await self._arun(self._cas(key, expected_version, value, ttl, write, request_id))
        return bool(reply[0]), reply[1]

    async def amget(
        self,
        keys: Iterable[str],
        default: Any = None,
        *,
        read: ReadConcern | str | None = None,
        max_lag_ms: float | None = None,
    ) -> list[Any]:
        return await self._arun(self._mget(keys, default, read, max_lag_ms))

    async def amset(
        self,
        mapping: Mapping[str, Any],
        *,
        ttl: float | None = None,
        write: WriteConcern | str | None = None,
        request_id: str | None = None,
    ) -> None:
        await self._arun(self._mset(mapping, ttl, write, request_id))

    async def ascan(
        self, prefix: str = "", *, page_size: int = 100, cursor: str | None = None
    ) -> ScanPage:
        items, nxt = await self._arun(self._scan(prefix, page_size, cursor))
        return ScanPage(items, nxt)
