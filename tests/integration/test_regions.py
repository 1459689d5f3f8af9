"""Federated regions end to end: two `cloud: local` regions, each its own Ray cluster started
with `app up --region`, whose gateways forward to each other (app.regions)."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from app.regions.auth import FORWARDED_FROM, SIGNATURE, sign
from tests.integration.regions_support import SECRET, Regions, local_regions, wait_federated
from tests.integration.support import wait_until

pytestmark = pytest.mark.integration

EAST, WEST = "test-east", "test-west"
REGIONS = {
    EAST: {
        "latitude": 40.7,
        "longitude": -74.0,
        "zones": [f"{EAST}-a"],
        "local": {"port_base": 24000, "num_cpus": 4},
        "models": {"echo": 1},
    },
    WEST: {
        "latitude": 37.8,
        "longitude": -122.4,
        "zones": [f"{WEST}-a"],
        "local": {"port_base": 26000, "num_cpus": 4},
        "models": {"echo": 1, "echo-west": 1},
    },
}
# Two requests fill an echo replica, so a third shows whether a full region spills.
# Unbounded queues: a saturated region's requests wait or spill to its peer; shedding them with
# 429 (the default queue bound) is tested elsewhere (test_cancellation.py).
CARDS = {
    "echo": {"max_ongoing_requests": 2, "max_queued_requests": -1},
    "echo-west": {"max_ongoing_requests": 8, "max_queued_requests": -1},
}


@pytest.fixture(scope="module")
def regions() -> Iterator[Regions]:
    # A short directory: Ray's unix sockets live under it and may not exceed 107 characters.
    directory = Path(tempfile.mkdtemp(prefix="fed", dir="/tmp"))
    try:
        with local_regions(directory, REGIONS, CARDS) as running:
            yield running
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def chat(url: str, model: str, text: str = "hello", **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}]} | extra
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def served_by(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["system_fingerprint"]).split("/")[0]


def test_a_model_only_the_peer_serves_is_answered_there(regions: Regions) -> None:
    response = chat(regions.urls[EAST], "echo-west", "forward me")
    assert served_by(response) == WEST
    assert response.json()["choices"][0]["message"]["content"] == "forward me"
    # The region's own models stay local.
    assert served_by(chat(regions.urls[EAST], "echo")) == EAST


def test_streams_are_relayed_intact(regions: Regions) -> None:
    text = "one two three four five six seven"
    client = OpenAI(base_url=f"{regions.urls[EAST]}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="echo-west", messages=[{"role": "user", "content": text}], stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces) == text
    assert len([p for p in pieces if p]) == 7  # token by token, not one merged chunk
    relayed = _raw_stream(regions.urls[EAST], text)
    direct = _raw_stream(regions.urls[WEST], text)
    assert relayed.endswith(b"data: [DONE]\n\n")
    assert _deltas(relayed) == _deltas(direct)


def _raw_stream(url: str, text: str) -> bytes:
    body = {"model": "echo-west", "stream": True, "messages": [{"role": "user", "content": text}]}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        return b"".join(response.iter_bytes())


def _deltas(raw: bytes) -> list[str]:
    return [
        line.split(b'"delta":', 1)[1].split(b"}", 1)[0].decode()
        for line in raw.split(b"\n\n")
        if b'"delta"' in line
    ]


def test_a_forward_without_a_valid_secret_is_refused(regions: Regions) -> None:
    url = f"{regions.urls[WEST]}/v1/chat/completions"
    body = b'{"model": "echo", "messages": [{"role": "user", "content": "x"}]}'
    headers = {"content-type": "application/json", FORWARDED_FROM: EAST}
    unsigned = httpx.post(url, content=body, headers=headers)
    assert unsigned.status_code == 401
    assert unsigned.json()["error"]["code"] == "invalid_federation_signature"
    forged = sign(b"not-the-federation-secret-at-all", EAST, "/v1/chat/completions", body)
    assert httpx.post(url, content=body, headers=headers | {SIGNATURE: forged}).status_code == 401
    other_body = sign(SECRET.encode(), EAST, "/v1/chat/completions", b"{}")
    assert (
        httpx.post(url, content=body, headers=headers | {SIGNATURE: other_body}).status_code == 401
    )
    good = sign(SECRET.encode(), EAST, "/v1/chat/completions", body)
    assert httpx.post(url, content=body, headers=headers | {SIGNATURE: good}).status_code == 200
    assert httpx.get(f"{regions.urls[WEST]}/federation/summary").status_code == 401
    # A model's own URL, where peers forward to directly, checks the same signature.
    model_url = f"{regions.urls[WEST]}/models/echo/v1/chat/completions"
    assert httpx.post(model_url, content=body, headers=headers).status_code == 401
    wrong_path = headers | {SIGNATURE: good}  # signed for the gateway's path, not this one
    assert httpx.post(model_url, content=body, headers=wrong_path).status_code == 401
    signed = sign(SECRET.encode(), EAST, "/models/echo/v1/chat/completions", body)
    assert (
        httpx.post(model_url, content=body, headers=headers | {SIGNATURE: signed}).status_code
        == 200
    )


def test_a_drained_region_sends_its_traffic_to_the_peer(regions: Regions) -> None:
    regions.drain(EAST)
    try:
        _wait_drained(regions, EAST, True)
        assert {served_by(chat(regions.urls[EAST], "echo")) for _ in range(5)} == {WEST}
    finally:
        regions.drain(EAST, False)
        _wait_drained(regions, EAST, False)
    assert served_by(chat(regions.urls[EAST], "echo")) == EAST


def test_both_regions_draining_is_a_503_not_a_ping_pong(regions: Regions) -> None:
    regions.drain(EAST)
    regions.drain(WEST)
    try:
        _wait_drained(regions, EAST, True)
        _wait_drained(regions, WEST, True)
        for url in regions.urls.values():
            started = time.monotonic()
            response = chat(url, "echo")
            assert response.status_code == 503, response.text
            assert int(response.headers["retry-after"]) > 0
            assert response.json()["error"]["type"] == "service_unavailable"
            assert time.monotonic() - started < 5  # answered, not bounced until a timeout
    finally:
        regions.drain(EAST, False)
        regions.drain(WEST, False)
        _wait_drained(regions, EAST, False)
        _wait_drained(regions, WEST, False)


def _wait_drained(regions: Regions, region: str, drained: bool) -> None:
    """Until the region's own gateway and its peer both see the drain state."""
    peer = WEST if region == EAST else EAST
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        own = regions.fleet(region)["federation"]
        seen = regions.fleet(peer)["federation"]["peers"][region]["summary"] or {}
        if own["drained"] == drained and seen.get("drained") == drained:
            return
        time.sleep(0.1)
    raise AssertionError(f"{region} drained={drained} not seen within 15 s")


def test_a_saturated_region_spills_to_the_peer(regions: Regions) -> None:
    replica = regions.replica_of(EAST, "echo")
    regions.fleet_cli(EAST, "fault", replica, "2500")
    try:
        time.sleep(1.5)  # the replica picks the fault up with its next heartbeat
        held: list[httpx.Response] = []
        threads = [
            threading.Thread(target=lambda: held.append(chat(regions.urls[EAST], "echo", "slow")))
            for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        time.sleep(0.7)  # both are in east's replica, which takes two at a time
        spilled = chat(regions.urls[EAST], "echo", "next")
        for thread in threads:
            thread.join()
    finally:
        regions.fleet_cli(EAST, "fault", replica, "0")
    assert [served_by(r) for r in held] == [EAST, EAST]
    assert served_by(spilled) == WEST


def test_losing_the_peer_under_load_fails_no_request(regions: Regions) -> None:
    """East is saturated (a slow replica), so its load spills to west; west's cluster is then
    stopped mid-run. Every request must still succeed (failed over to east), west must leave
    rotation, and come back once it runs again."""
    replica = regions.replica_of(EAST, "echo")
    regions.fleet_cli(EAST, "fault", replica, "150")
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                body = {"model": "echo", "messages": [{"role": "user", "content": "load"}]}
                r = http.post(f"{regions.urls[EAST]}/v1/chat/completions", json=body)
                fingerprint = r.json().get("system_fingerprint", "") if r.status_code == 200 else ""
                results.append((r.status_code, str(fingerprint).split("/")[0]))

    threads = [threading.Thread(target=client) for _ in range(6)]
    try:
        time.sleep(1.0)
        for thread in threads:
            thread.start()
        wait_until(lambda: any(r == WEST for _, r in results), 20, "spill-over to west")
        regions.down(WEST)
        lost_at = len(results)
        wait_until(lambda: _peer(regions, WEST)["in_rotation"] is False, 20, "west out of rotation")
        wait_until(lambda: len(results) > lost_at + 20, 60, "requests after the loss")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=90)
        regions.fleet_cli(EAST, "fault", replica, "0")
    failures = [status for status, _ in results if status != 200]
    assert not failures, f"{len(failures)} of {len(results)} requests failed: {failures[:5]}"
    assert {region for _, region in results[lost_at + 5 :]} == {EAST}
    regions.up(WEST)
    wait_federated(regions, [EAST, WEST])
    assert _peer(regions, WEST)["in_rotation"] is True
    assert served_by(chat(regions.urls[EAST], "echo-west")) == WEST


def _peer(regions: Regions, region: str) -> dict[str, Any]:
    peer: dict[str, Any] = regions.fleet(EAST)["federation"]["peers"][region]
    return peer


def test_fleet_status_shows_every_region(regions: Regions) -> None:
    federation = regions.fleet(EAST)["federation"]
    assert federation["region"] == EAST and federation["forwarding"] is True
    west = federation["peers"][WEST]
    assert west["endpoint"] == regions.urls[WEST]
    assert set(west["summary"]["models"]) == {"echo", "echo-west"}
    assert west["summary_age_s"] < 5
    text = regions.app("region", "--fleet", str(regions.spec_path), "status", EAST).stdout
    assert WEST in text and "in rotation" in text
    assert f"peers:\n  {WEST}" in regions.fleet_cli(EAST, "status")  # app fleet status too
    health = httpx.get(f"{regions.urls[EAST]}/healthz", timeout=10).json()
    assert health == {"status": "ok", "models": {"echo": "RUNNING", "echo-west": "SERVED_BY_PEERS"}}
    listed = {m["id"] for m in httpx.get(f"{regions.urls[EAST]}/v1/models").json()["data"]}
    assert listed == {"echo", "echo-west"}  # any region's entry point lists every model
