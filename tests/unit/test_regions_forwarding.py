"""Forwarding to a peer region against a real HTTP server on loopback: how answers are classified."""

from __future__ import annotations

import asyncio
import socket
import socketserver
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from app.api.errors import RequestTimeoutError
from app.api.sse import SSE_DONE
from app.regions.auth import FORWARDED_FROM, SIGNATURE, verify
from app.regions.forwarding import (
    RETRY_STATUSES,
    SUMMARY_PATH,
    Forwarder,
    PeerAnswerError,
    PeerBusyError,
    PeerUnreachableError,
)
from app.regions.spec import Federation
from app.regions.summary import ModelLoad, RegionSummary

SECRET = b"a federation secret for the tests"
OWN_REGION = "us-east-1"
PATH = "/v1/chat/completions"
BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":false}'
CONFIG = Federation(summary_timeout_s=5, connect_timeout_s=5, forward_timeout_s=10)

PEER_SUMMARY = RegionSummary(
    "eu-west-1",
    models={"m": ModelLoad(replicas=2, healthy=2, capacity=8, ongoing=3, latency_ms=120.0)},
    generated_at=1_700_000_000.0,
)
SSE_EVENTS = [
    b'data: {"id":"c1","choices":[{"delta":{"content":"Hel"}}]}\n\n',
    b'data: {"id":"c1","choices":[{"delta":{"content":"lo"}}]}\n\n',
    SSE_DONE,
]
OPENAI_ERROR = {
    "error": {
        "message": "messages must not be empty",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "empty_messages",
    }
}


# ---- the peer: a small Starlette app served by uvicorn in a thread ---------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    refusal: str | None  # what auth.verify says of the request's signature, server side


@dataclass
class Peer:
    base_url: str
    seen: list[Seen] = field(default_factory=list)


def peer_app(seen: list[Seen]) -> Starlette:
    async def record(request: Request) -> None:
        body = await request.body()
        refusal = verify(
            SECRET,
            request.headers.get(SIGNATURE),
            request.headers.get(FORWARDED_FROM),
            request.url.path,
            body,
        )
        seen.append(Seen(request.method, request.url.path, dict(request.headers), body, refusal))

    async def ok(request: Request) -> Response:
        await record(request)
        return JSONResponse({"id": "cmpl-1", "object": "chat.completion", "served_by": "peer"})

    async def sse(request: Request) -> Response:
        await record(request)

        async def events() -> AsyncIterator[bytes]:
            for event in SSE_EVENTS:
                yield event

        return StreamingResponse(events(), media_type="text/event-stream")

    async def broken(request: Request) -> Response:
        await record(request)

        async def events() -> AsyncIterator[bytes]:
            yield SSE_EVENTS[0]
            await asyncio.sleep(0.05)
            raise RuntimeError("the peer's replica died mid-stream")

        return StreamingResponse(events(), media_type="text/event-stream")

    async def status(request: Request) -> Response:
        await record(request)
        code = int(request.path_params["code"])
        return Response(b'{"error":{"message":"busy"}}', status_code=code)

    async def openai_error(request: Request) -> Response:
        await record(request)
        return JSONResponse(OPENAI_ERROR, status_code=int(request.path_params["code"]))

    async def timed_out(request: Request) -> Response:
        await record(request)
        return JSONResponse(RequestTimeoutError("too slow").body(), status_code=504)

    async def html_error(request: Request) -> Response:
        return Response(b"<html>oops</html>", status_code=500, media_type="text/html")

    async def list_error(request: Request) -> Response:
        return JSONResponse(["not", "an", "object"], status_code=400)

    async def garbage(request: Request) -> Response:
        return Response(b"\x00\xffnot json{", media_type="application/json")

    async def slow(request: Request) -> Response:
        await asyncio.sleep(2.0)
        return JSONResponse({"late": True})

    async def drip(request: Request) -> Response:
        async def pieces() -> AsyncIterator[bytes]:
            for piece in (b'{"id":', b'"cmpl-1",', b'"object":', b'"chat', b'.completion"', b"}"):
                yield piece
                await asyncio.sleep(0.3)

        return StreamingResponse(pieces(), media_type="application/json")

    async def summary(request: Request) -> Response:
        await record(request)
        return JSONResponse(PEER_SUMMARY.to_json())

    async def proxy_down(request: Request) -> Response:
        # What HAProxy answers when the gateway behind it is gone.
        return Response(b"<html><body><h1>503 Service Unavailable</h1></body></html>", 503)

    async def summary_busy(request: Request) -> Response:
        return JSONResponse({"error": {"message": "busy"}}, status_code=503)

    async def summary_garbage(request: Request) -> Response:
        return Response(b"<html>a login page</html>", media_type="text/html")

    async def summary_slow(request: Request) -> Response:
        await asyncio.sleep(2.0)
        return JSONResponse(PEER_SUMMARY.to_json())

    return Starlette(
        routes=[
            Route("/ok", ok, methods=["POST"]),
            Route("/proxy-down", proxy_down, methods=["POST"]),
            Route(PATH, ok, methods=["POST"]),
            Route("/sse", sse, methods=["POST"]),
            Route("/broken", broken, methods=["POST"]),
            Route("/status/{code}", status, methods=["POST"]),
            Route("/openai-error/{code}", openai_error, methods=["POST"]),
            Route("/html-error", html_error, methods=["POST"]),
            Route("/timed-out", timed_out, methods=["POST"]),
            Route("/list-error", list_error, methods=["POST"]),
            Route("/garbage", garbage, methods=["POST"]),
            Route("/slow", slow, methods=["POST"]),
            Route("/drip", drip, methods=["POST"]),
            Route(SUMMARY_PATH, summary, methods=["GET"]),
            Route("/busy" + SUMMARY_PATH, summary_busy, methods=["GET"]),
            Route("/garbage" + SUMMARY_PATH, summary_garbage, methods=["GET"]),
            Route("/slow" + SUMMARY_PATH, summary_slow, methods=["GET"]),
        ]
    )


@pytest.fixture(scope="module")
def server() -> Iterator[Peer]:
    seen: list[Seen] = []
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        peer_app(seen),
        log_config=None,
        log_level="critical",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=1,
    )
    runner = uvicorn.Server(config)
    thread = threading.Thread(target=runner.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not runner.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test peer did not start"
        time.sleep(0.01)
    try:
        yield Peer(f"http://127.0.0.1:{port}", seen)
    finally:
        runner.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def peer(server: Peer) -> Peer:
    server.seen.clear()
    return server


class _Garbage(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.recv(65536)
        self.request.sendall(b"SSH-2.0-OpenSSH_9.6\r\nthis is not HTTP\r\n\r\n")


@pytest.fixture(scope="module")
def garbage_url() -> Iterator[str]:
    """A TCP server that answers anything with bytes that are not HTTP."""
    tcp = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Garbage)
    tcp.daemon_threads = True
    thread = threading.Thread(target=tcp.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{tcp.server_address[1]}"
    finally:
        tcp.shutdown()
        tcp.server_close()


@pytest.fixture
def closed_url() -> str:
    """A loopback port nothing listens on: connections are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
async def forwarder() -> AsyncIterator[Forwarder]:
    fw = Forwarder(CONFIG, OWN_REGION, SECRET)
    try:
        yield fw
    finally:
        await fw.aclose()


async def collect(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([piece async for piece in stream])


# ---- unary ------------------------------------------------------------------------------------


async def test_unary_returns_the_peers_json(peer: Peer, forwarder: Forwarder) -> None:
    payload = await forwarder.unary(peer.base_url, PATH, BODY, {"x-request-id": "req-1"})
    assert payload == {"id": "cmpl-1", "object": "chat.completion", "served_by": "peer"}
    [seen] = peer.seen
    assert (seen.method, seen.path, seen.body) == ("POST", PATH, BODY)
    assert seen.headers["x-request-id"] == "req-1"
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers[FORWARDED_FROM] == OWN_REGION


async def test_the_signature_verifies_on_the_peer(peer: Peer, forwarder: Forwarder) -> None:
    await forwarder.unary(peer.base_url, PATH, BODY, {})
    stream = await forwarder.stream(peer.base_url, "/sse", BODY, {})
    await collect(stream)
    await forwarder.summary(peer.base_url)
    assert [(s.method, s.path) for s in peer.seen] == [
        ("POST", PATH),
        ("POST", "/sse"),
        ("GET", SUMMARY_PATH),
    ]
    assert [s.refusal for s in peer.seen] == [None, None, None]
    assert peer.seen[2].body == b""


async def test_a_forwarder_with_another_secret_is_refused_by_the_peer(peer: Peer) -> None:
    fw = Forwarder(CONFIG, OWN_REGION, b"not the federation secret at all")
    try:
        await fw.unary(peer.base_url, PATH, BODY, {})
    finally:
        await fw.aclose()
    assert peer.seen[0].refusal == "the federation signature does not match"


async def test_client_headers_cannot_forge_the_hop_or_the_signature(
    peer: Peer, forwarder: Forwarder
) -> None:
    forged = {FORWARDED_FROM: "somewhere-else", SIGNATURE: "t=1,s=00", "x-request-id": "r"}
    await forwarder.unary(peer.base_url, PATH, BODY, forged)
    [seen] = peer.seen
    assert seen.headers[FORWARDED_FROM] == OWN_REGION
    assert seen.headers[SIGNATURE] != "t=1,s=00"
    assert seen.refusal is None


@pytest.mark.parametrize("status", [429, 502, 503, 504])
async def test_unary_busy_answers_raise_peer_busy(
    peer: Peer, forwarder: Forwarder, status: int
) -> None:
    with pytest.raises(PeerBusyError) as caught:
        await forwarder.unary(peer.base_url, f"/status/{status}", BODY, {})
    assert caught.value.status == status
    assert caught.value.body == b'{"error":{"message":"busy"}}'


async def test_a_proxy_error_page_means_the_peer_gateway_is_gone(
    peer: Peer, forwarder: Forwarder
) -> None:
    """A 503 that is not the gateway's OpenAI body counts against the peer's rotation."""
    with pytest.raises(PeerUnreachableError, match="proxy answered 503"):
        await forwarder.unary(peer.base_url, "/proxy-down", BODY, {})
    with pytest.raises(PeerUnreachableError, match="proxy answered 503"):
        await forwarder.stream(peer.base_url, "/proxy-down", BODY, {})


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_unary_client_errors_are_relayed_as_they_are(
    peer: Peer, forwarder: Forwarder, status: int
) -> None:
    with pytest.raises(PeerAnswerError) as caught:
        await forwarder.unary(peer.base_url, f"/openai-error/{status}", BODY, {})
    error = caught.value
    assert error.status == status
    assert error.message == "messages must not be empty"
    assert error.type == "invalid_request_error"
    assert error.param == "messages"
    assert error.code == "empty_messages"
    assert error.body() == OPENAI_ERROR


async def test_other_server_errors_are_final_not_busy(peer: Peer, forwarder: Forwarder) -> None:
    assert frozenset({429, 502, 503, 504}) == RETRY_STATUSES
    with pytest.raises(PeerAnswerError) as caught:
        await forwarder.unary(peer.base_url, "/status/500", BODY, {})
    assert caught.value.status == 500
    assert caught.value.message == "busy"


async def test_a_request_that_ran_out_of_time_on_the_peer_is_final(
    peer: Peer, forwarder: Forwarder
) -> None:
    """A 504 whose body says the request itself timed out is relayed, not retried elsewhere:
    another region would run it from the start again."""
    for call in (forwarder.unary, forwarder.stream):
        with pytest.raises(PeerAnswerError) as caught:
            await call(peer.base_url, "/timed-out", BODY, {})
        assert caught.value.status == 504
        assert caught.value.body()["error"]["type"] == "timeout"


async def test_an_error_without_an_openai_body_gets_a_generic_one(
    peer: Peer, forwarder: Forwarder
) -> None:
    with pytest.raises(PeerAnswerError) as caught:
        await forwarder.unary(peer.base_url, "/html-error", BODY, {})
    assert caught.value.status == 500
    assert caught.value.message == "peer region answered 500"
    assert caught.value.type == "server_error"
    with pytest.raises(PeerAnswerError) as listed:
        await forwarder.unary(peer.base_url, "/list-error", BODY, {})
    assert listed.value.status == 400
    assert listed.value.message == "peer region answered 400"


async def test_unary_garbage_200_counts_as_unreachable(peer: Peer, forwarder: Forwarder) -> None:
    with pytest.raises(PeerUnreachableError, match="not JSON"):
        await forwarder.unary(peer.base_url, "/garbage", BODY, {})


async def test_unary_not_http_counts_as_unreachable(garbage_url: str, forwarder: Forwarder) -> None:
    with pytest.raises(PeerUnreachableError):
        await forwarder.unary(garbage_url, PATH, BODY, {})


async def test_unary_connection_refused(closed_url: str, forwarder: Forwarder) -> None:
    with pytest.raises(PeerUnreachableError, match="ConnectError"):
        await forwarder.unary(closed_url, PATH, BODY, {})


async def test_unary_timeout_counts_as_unreachable(peer: Peer) -> None:
    fw = Forwarder(Federation(forward_timeout_s=0.3), OWN_REGION, SECRET)
    try:
        with pytest.raises(PeerUnreachableError, match="Timeout"):
            await fw.unary(peer.base_url, "/slow", BODY, {})
    finally:
        await fw.aclose()


async def test_forward_timeout_bounds_the_whole_unary_response(peer: Peer) -> None:
    fw = Forwarder(Federation(forward_timeout_s=1.0), OWN_REGION, SECRET)
    started = time.monotonic()
    try:
        with pytest.raises(PeerUnreachableError):
            await fw.unary(peer.base_url, "/drip", BODY, {})
    finally:
        await fw.aclose()
    assert time.monotonic() - started < 1.5


# ---- stream -----------------------------------------------------------------------------------


async def test_stream_relays_the_peers_events(peer: Peer, forwarder: Forwarder) -> None:
    stream = await forwarder.stream(peer.base_url, "/sse", BODY, {"x-request-id": "s1"})
    assert await collect(stream) == b"".join(SSE_EVENTS)
    [seen] = peer.seen
    assert seen.refusal is None
    assert seen.headers["x-request-id"] == "s1"


async def test_stream_broken_after_the_first_byte_ends_with_error_then_done(
    peer: Peer, forwarder: Forwarder
) -> None:
    stream = await forwarder.stream(peer.base_url, "/broken", BODY, {})
    data = await collect(stream)
    assert data.startswith(SSE_EVENTS[0])
    assert data.endswith(b"\n\n" + SSE_DONE)
    assert data.count(b"[DONE]") == 1
    events = [event for event in data.split(b"\n\n") if event]
    assert len(events) == 3
    assert events[-1] == SSE_DONE.rstrip(b"\n")
    assert events[1].startswith(b"data: ")
    error = orjson.loads(events[1].removeprefix(b"data: "))["error"]
    assert error["type"] == "server_error"
    assert error["message"].startswith("the peer region's stream broke: ")


@pytest.mark.parametrize("status", [429, 502, 503, 504])
async def test_stream_busy_before_the_first_byte_raises_peer_busy(
    peer: Peer, forwarder: Forwarder, status: int
) -> None:
    with pytest.raises(PeerBusyError) as caught:
        await forwarder.stream(peer.base_url, f"/status/{status}", BODY, {})
    assert caught.value.status == status
    assert caught.value.body == b'{"error":{"message":"busy"}}'


async def test_stream_client_error_is_relayed(peer: Peer, forwarder: Forwarder) -> None:
    with pytest.raises(PeerAnswerError) as caught:
        await forwarder.stream(peer.base_url, "/openai-error/400", BODY, {})
    error = caught.value
    assert (error.status, error.message, error.type) == (
        400,
        "messages must not be empty",
        "invalid_request_error",
    )
    assert (error.param, error.code) == ("messages", "empty_messages")


async def test_stream_connection_refused(closed_url: str, forwarder: Forwarder) -> None:
    with pytest.raises(PeerUnreachableError, match="ConnectError"):
        await forwarder.stream(closed_url, PATH, BODY, {})


async def test_stream_not_http_counts_as_unreachable(
    garbage_url: str, forwarder: Forwarder
) -> None:
    with pytest.raises(PeerUnreachableError):
        await forwarder.stream(garbage_url, PATH, BODY, {})


async def test_the_pool_survives_failed_streams(peer: Peer, forwarder: Forwarder) -> None:
    # Responses refused before their first byte are closed, so later requests still get through.
    for _ in range(3):
        with pytest.raises(PeerBusyError):
            await forwarder.stream(peer.base_url, "/status/503", BODY, {})
    assert await collect(await forwarder.stream(peer.base_url, "/sse", BODY, {})) == b"".join(
        SSE_EVENTS
    )


# ---- summary ----------------------------------------------------------------------------------


async def test_summary_returns_the_peers_summary(peer: Peer, forwarder: Forwarder) -> None:
    data = await forwarder.summary(peer.base_url)
    assert RegionSummary.from_json(data) == PEER_SUMMARY
    [seen] = peer.seen
    assert (seen.method, seen.path, seen.refusal) == ("GET", SUMMARY_PATH, None)


async def test_summary_non_200_counts_as_unreachable(peer: Peer, forwarder: Forwarder) -> None:
    with pytest.raises(PeerUnreachableError, match="summary answered 503"):
        await forwarder.summary(peer.base_url + "/busy")


async def test_summary_garbage_is_a_failure(peer: Peer, forwarder: Forwarder) -> None:
    # The caller counts either as a failed pull (federation catches both).
    with pytest.raises((PeerUnreachableError, ValueError)):
        await forwarder.summary(peer.base_url + "/garbage")


async def test_summary_connection_refused(closed_url: str, forwarder: Forwarder) -> None:
    with pytest.raises(PeerUnreachableError, match="ConnectError"):
        await forwarder.summary(closed_url)


async def test_summary_not_http_counts_as_unreachable(
    garbage_url: str, forwarder: Forwarder
) -> None:
    with pytest.raises(PeerUnreachableError):
        await forwarder.summary(garbage_url)


async def test_summary_has_its_own_timeout(peer: Peer) -> None:
    config = Federation(summary_timeout_s=0.3, forward_timeout_s=30)
    fw = Forwarder(config, OWN_REGION, SECRET)
    started = time.monotonic()
    try:
        with pytest.raises(PeerUnreachableError, match="Timeout"):
            await fw.summary(peer.base_url + "/slow")
    finally:
        await fw.aclose()
    assert time.monotonic() - started < 1.5
