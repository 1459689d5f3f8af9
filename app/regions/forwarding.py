"""HTTP to peer regions' gateways: forward one OpenAI request (unary or streamed, relayed as it
arrives) and pull a peer's summary. Failures are classified for failover: a peer that cannot be
reached, and one that answers 429/502/503/504, let the caller try the next region; any other
answer is the client's answer and is relayed as it is. So is a 504 whose body says the request
itself ran out of time (type "timeout"): another region would only run it again from the
start."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

from app.api.errors import APIError, RequestTimeoutError, error_json
from app.api.sse import SSE_DONE
from app.regions.auth import FORWARDED_FROM, SIGNATURE, sign
from app.regions.spec import Federation

SUMMARY_PATH = "/federation/summary"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
REGION_HEADER = "x-app-region"  # on every response: the region that served it


class PeerUnreachableError(Exception):
    """The peer could not be reached or broke the exchange (counts against its rotation)."""


class PeerBusyError(Exception):
    """The peer answered but cannot serve now (429/502/503/504): try another region."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"peer answered {status}")
        self.status, self.body = status, body


class PeerAnswerError(APIError):
    """A peer's final error answer (400, 404, ...), relayed with its status and body."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        found = body.get("error")
        error: dict[str, Any] = found if isinstance(found, dict) else {}
        super().__init__(
            str(error.get("message") or f"peer region answered {status}"),
            param=error.get("param"),
            code=error.get("code"),
        )
        self.status = status
        self.type = str(error.get("type") or "server_error")


class Forwarder:
    """One pooled HTTP client per gateway replica, used for every peer."""

    def __init__(self, config: Federation, own_region: str, secret: bytes) -> None:
        self._region, self._secret = own_region, secret
        self._deadline_s = config.forward_timeout_s
        # A pull never outlasts the pull period, so a dead peer is noticed every period.
        self._summary_timeout = httpx.Timeout(
            min(config.summary_timeout_s, config.summary_interval_s)
        )
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.forward_timeout_s, connect=config.connect_timeout_s),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
        )

    def _headers(self, path: str, body: bytes, extra: dict[str, str]) -> dict[str, str]:
        return extra | {
            "content-type": "application/json",
            FORWARDED_FROM: self._region,
            SIGNATURE: sign(self._secret, self._region, path, body),
        }

    async def summary(self, base_url: str) -> dict[str, Any]:
        headers = self._headers(SUMMARY_PATH, b"", {})
        try:
            response = await self._client.get(
                base_url + SUMMARY_PATH, headers=headers, timeout=self._summary_timeout
            )
        except httpx.HTTPError as exc:
            raise PeerUnreachableError(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise PeerUnreachableError(f"summary answered {response.status_code}")
        data: dict[str, Any] = orjson.loads(response.content)
        return data

    async def unary(
        self, base_url: str, path: str, body: bytes, headers: dict[str, str]
    ) -> dict[str, Any]:
        try:
            # httpx's timeouts bound each read; the whole answer gets one deadline too.
            async with asyncio.timeout(self._deadline_s):
                response = await self._client.post(
                    base_url + path, content=body, headers=self._headers(path, body, headers)
                )
        except (httpx.HTTPError, TimeoutError) as exc:
            raise PeerUnreachableError(f"{type(exc).__name__}: {exc}") from exc
        _raise_for(response.status_code, response.content)
        try:
            payload: dict[str, Any] = orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise PeerUnreachableError("peer answered 200 with a body that is not JSON") from exc
        return payload

    async def stream(
        self, base_url: str, path: str, body: bytes, headers: dict[str, str]
    ) -> AsyncIterator[bytes]:
        """The peer's SSE writes once it has answered 200; errors before that raise, so the
        caller can still fail over (a stream is retried only before its first byte)."""
        request = self._client.build_request(
            "POST", base_url + path, content=body, headers=self._headers(path, body, headers)
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise PeerUnreachableError(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            content = await response.aread()
            await response.aclose()
            _raise_for(response.status_code, content)
        return _relay(response)

    async def aclose(self) -> None:
        await self._client.aclose()


def _raise_for(status: int, content: bytes) -> None:
    if status == 200:
        return
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        body = {}
    if status in RETRY_STATUSES and not _timed_out(body):
        if not (isinstance(body, dict) and isinstance(body.get("error"), dict)):
            # Not the peer gateway's answer but its proxy's error page: the gateway is down
            # (a region going away looks like this first), so it counts against rotation.
            raise PeerUnreachableError(f"peer's proxy answered {status}")
        raise PeerBusyError(status, content)
    raise PeerAnswerError(status, body if isinstance(body, dict) else {})


def _timed_out(body: Any) -> bool:
    """An OpenAI error body of type "timeout" (RequestTimeoutError): the peer ran the request
    to its model's time limit."""
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and error.get("type") == RequestTimeoutError.type


async def _relay(response: httpx.Response) -> AsyncIterator[bytes]:
    """Pass the peer's bytes through as they come; a break after the first byte ends the
    client's stream with an error event and [DONE], as a local stream would."""
    try:
        async for piece in response.aiter_bytes():
            yield piece
    except httpx.HTTPError as exc:
        failure = APIError(f"the peer region's stream broke: {type(exc).__name__}")
        yield b"data: " + error_json(failure) + b"\n\n" + SSE_DONE
    finally:
        await response.aclose()
