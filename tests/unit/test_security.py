"""app.security without Ray: keys, the guard's answers, cluster-wide limits over a shared bank
(an in-memory Bank with the KV bank's semantics), and the HTTP routes with keys on."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from app.api.errors import (
    AuthenticationError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
)
from app.api.http import OpenAIRoutes
from app.security.config import Auth, AuthMode
from app.security.guard import Guard, KeyLookup, estimate_tokens
from app.security.keys import KeyLimits, KeyRecord, Scope, key_id_of, matches, new_key
from app.security.limits import HOLD_TTL_S, Bank, Limiter
from tests.unit.test_http import EchoBackend, chat, post_scope


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class MemoryBank(Bank):
    """The KV bank's semantics in one process: counters with a limit, holdings that expire."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.counters: dict[str, int] = {}
        self.holdings: dict[str, dict[str, tuple[int, float]]] = {}
        self.calls = 0

    async def take(self, counter: str, wanted: int, limit: int, ttl_s: float) -> tuple[int, int]:
        self.calls += 1
        used = self.counters.get(counter, 0)
        granted = max(0, min(wanted, limit - used))
        self.counters[counter] = used + granted
        return granted, used + granted

    async def hold(
        self, counter: str, holder: str, count: int, limit: int, ttl_s: float
    ) -> tuple[int, int]:
        self.calls += 1
        now = self.clock()
        live = {h: v for h, v in self.holdings.get(counter, {}).items() if v[1] > now}
        mine = live.pop(holder, (0, 0.0))[0]
        others = sum(v[0] for v in live.values())
        share = count if count <= mine else max(mine, min(count, limit - others))
        if share:
            live[holder] = (share, now + ttl_s)
        self.holdings[counter] = live
        return share, others + share


class Keys(KeyLookup):
    def __init__(self, *records: KeyRecord) -> None:
        self.records = {r.key_id: r for r in records}
        self.fetches = 0
        self.down = False

    async def fetch(self, key_id: str) -> KeyRecord | None:
        self.fetches += 1
        if self.down:
            raise ConnectionError("store down")
        return self.records.get(key_id)


def make_key(
    scopes: tuple[Scope, ...] = (Scope.INFERENCE,), **limits: int
) -> tuple[str, KeyRecord]:
    return new_key("test", scopes, KeyLimits(**limits), 0.0)


def guard(keys: Keys, clock: Clock, bank: MemoryBank | None = None, holder: str = "p1") -> Guard:
    auth = Auth(mode=AuthMode.KEYS, key_cache_s=10)
    limiter = Limiter(bank or MemoryBank(clock), holder, lease_fraction=0.05, clock=clock)
    return Guard(auth, keys, limiter, clock=clock)


# ---- keys -----------------------------------------------------------------------------------


def test_a_key_is_stored_only_as_its_hash_and_parses_back_to_its_id() -> None:
    key, record = make_key()
    assert key.startswith("sk-app-") and key_id_of(key) == record.key_id
    assert key not in record.model_dump_json() and key not in repr(record)
    other = key[:-1] + ("y" if key.endswith("x") else "x")
    assert matches(record, key) and not matches(record, other)
    assert key_id_of("sk-app-nothex_" + "a" * 32) is None and key_id_of("Bearer x") is None


def test_admin_implies_inference_but_not_the_reverse() -> None:
    _, admin = make_key((Scope.ADMIN,))
    _, user = make_key()
    assert admin.allows(Scope.INFERENCE) and admin.allows(Scope.ADMIN)
    assert user.allows(Scope.INFERENCE) and not user.allows(Scope.ADMIN)


# ---- the guard ------------------------------------------------------------------------------


async def test_missing_malformed_unknown_and_revoked_keys_are_401() -> None:
    key, record = make_key()
    revoked_key, revoked = make_key()
    keys = Keys(record, revoked.model_copy(update={"revoked_s": 1.0}))
    g = guard(keys, Clock())
    for header in (None, "", "Basic abc", "Bearer sk-app-short", f"Bearer {key[:-1]}x"):
        with pytest.raises(AuthenticationError):
            await g.check(header, Scope.INFERENCE)
    with pytest.raises(AuthenticationError, match="revoked"):
        await g.check(f"Bearer {revoked_key}", Scope.INFERENCE)
    permit = await g.check(f"Bearer {key}", Scope.INFERENCE)
    await permit.finish(0)


async def test_a_key_without_the_scope_is_403() -> None:
    key, record = make_key()
    with pytest.raises(PermissionDeniedError, match="admin"):
        await guard(Keys(record), Clock()).check(f"Bearer {key}", Scope.ADMIN)


async def test_lookups_are_cached_and_a_revocation_lands_within_the_cache_period() -> None:
    key, record = make_key()
    keys, clock = Keys(record), Clock()
    g = guard(keys, clock)
    for _ in range(5):
        await (await g.check(f"Bearer {key}", Scope.INFERENCE)).finish(0)
    assert keys.fetches == 1
    keys.records[record.key_id] = record.model_copy(update={"revoked_s": clock.now})
    await (await g.check(f"Bearer {key}", Scope.INFERENCE)).finish(0)  # still cached
    clock.now += 11
    with pytest.raises(AuthenticationError, match="revoked"):
        await g.check(f"Bearer {key}", Scope.INFERENCE)


async def test_an_unreachable_key_store_fails_closed_with_503() -> None:
    key, record = make_key()
    keys = Keys(record)
    keys.down = True
    with pytest.raises(ServiceUnavailableError):
        await guard(keys, Clock()).check(f"Bearer {key}", Scope.INFERENCE)


# ---- limits, cluster-wide -------------------------------------------------------------------


async def test_requests_per_minute_hold_across_two_processes_sharing_the_bank() -> None:
    key, record = make_key(requests_per_minute=10)
    clock = Clock(60.0 * 1000)  # the start of a minute
    bank = MemoryBank(clock)
    replicas = [guard(Keys(record), clock, bank, holder=f"p{i}") for i in range(2)]
    admitted, refused = 0, []
    for i in range(16):
        try:
            permit = await replicas[i % 2].check(f"Bearer {key}", Scope.INFERENCE)
        except RateLimitError as exc:
            refused.append(exc)
        else:
            admitted += 1
            await permit.finish(0)
    assert admitted == 10 and len(refused) == 6
    assert refused[0].status == 429 and refused[0].headers()["Retry-After"] == "60"
    assert refused[0].headers()["x-ratelimit-remaining-requests"] == "0"
    clock.now += 60  # the next minute: a fresh budget
    await (await replicas[0].check(f"Bearer {key}", Scope.INFERENCE)).finish(0)


async def test_leases_spare_the_bank_most_calls_under_a_large_limit() -> None:
    key, record = make_key(requests_per_minute=10_000)
    clock = Clock(60.0 * 1000)
    bank = MemoryBank(clock)
    g = guard(Keys(record), clock, bank)
    for _ in range(1000):
        permit = await g.check(f"Bearer {key}", Scope.INFERENCE)
        await permit.finish(0)
    # A lease is 5 % of the budget (500 requests): two bank calls for 1000 requests.
    assert bank.calls == 2
    assert permit.headers["x-ratelimit-limit-requests"] == "10000"
    assert permit.headers["x-ratelimit-remaining-requests"] == "9000"


async def test_tokens_are_charged_the_estimate_then_the_real_usage() -> None:
    key, record = make_key(tokens_per_minute=1000)
    clock = Clock(60.0 * 1000)
    g = guard(Keys(record), clock)
    first = await g.check(f"Bearer {key}", Scope.INFERENCE, tokens=600)
    with pytest.raises(RateLimitError, match="tokens"):
        await g.check(f"Bearer {key}", Scope.INFERENCE, tokens=600)
    await first.finish(100)  # it used 100: 500 come back
    second = await g.check(f"Bearer {key}", Scope.INFERENCE, tokens=600)
    assert second.headers["x-ratelimit-remaining-tokens"] == "300"


async def test_concurrency_is_cluster_wide_and_a_dead_processs_slots_expire() -> None:
    key, record = make_key(max_concurrent=2)
    clock = Clock()
    bank = MemoryBank(clock)
    a, b = (guard(Keys(record), clock, bank, holder=h) for h in ("a", "b"))
    held = [await a.check(f"Bearer {key}", Scope.INFERENCE) for _ in range(2)]
    with pytest.raises(RateLimitError, match="in flight"):
        await b.check(f"Bearer {key}", Scope.INFERENCE)
    await held[0].finish(0)
    clock.now += 2  # a's free slot idles past idle_s and goes back at its next finish
    await held[1].finish(0)
    third = await b.check(f"Bearer {key}", Scope.INFERENCE)
    # b now holds one; process b dies holding it: it is free again once its holding expires.
    blocked = [await a.check(f"Bearer {key}", Scope.INFERENCE)]
    with pytest.raises(RateLimitError):
        await a.check(f"Bearer {key}", Scope.INFERENCE)
    assert not third.done
    clock.now += HOLD_TTL_S + 1
    blocked.append(await a.check(f"Bearer {key}", Scope.INFERENCE))
    for permit in blocked:
        await permit.finish(0)


def test_the_estimate_counts_text_and_the_completion_it_may_generate() -> None:
    assert estimate_tokens(400, 50, 2) == 100 + 100
    assert estimate_tokens(0, None, 1) == 256


# ---- the routes with keys on ----------------------------------------------------------------


@pytest.fixture
async def keyed() -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str], OpenAIRoutes]]:
    user_key, user = make_key(requests_per_minute=3)
    admin_key, admin = make_key((Scope.ADMIN,))
    routes = OpenAIRoutes(EchoBackend(), guard(Keys(user, admin), Clock(time.time())))

    async def fleet(_: Any) -> Any:
        from app.api.http import json_response

        return json_response({"fleet": True})

    routes.add_get("/v1/fleet", fleet)
    transport = httpx.ASGITransport(app=routes.asgi)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c, {"user": user_key, "admin": admin_key}, routes


async def test_routes_refuse_without_a_key_and_answer_with_one(
    keyed: tuple[httpx.AsyncClient, dict[str, str], OpenAIRoutes],
) -> None:
    client, keys, _ = keyed
    bare = await client.post("/v1/chat/completions", json=chat())
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
    assert bare.headers["www-authenticate"] == "Bearer"
    ok = await client.post(
        "/v1/chat/completions", json=chat(), headers={"Authorization": f"Bearer {keys['user']}"}
    )
    assert ok.status_code == 200, ok.text
    assert ok.headers["x-ratelimit-limit-requests"] == "3"
    assert (await client.get("/healthz")).status_code == 200  # no key needed
    assert (await client.get("/v1/models")).status_code == 401


async def test_admin_routes_need_the_admin_scope(
    keyed: tuple[httpx.AsyncClient, dict[str, str], OpenAIRoutes],
) -> None:
    client, keys, _ = keyed
    user = await client.get("/v1/fleet", headers={"Authorization": f"Bearer {keys['user']}"})
    assert user.status_code == 403 and user.json()["error"]["type"] == "permission_error"
    admin = await client.get("/v1/fleet", headers={"Authorization": f"Bearer {keys['admin']}"})
    assert admin.status_code == 200


async def test_a_stream_holds_its_permit_until_it_ends_and_limits_give_429(
    keyed: tuple[httpx.AsyncClient, dict[str, str], OpenAIRoutes],
) -> None:
    client, keys, _ = keyed
    headers = {"Authorization": f"Bearer {keys['user']}"}
    codes = []
    for _ in range(4):
        r = await client.post("/v1/chat/completions", json=chat(stream=True), headers=headers)
        codes.append(r.status_code)
    assert codes == [200, 200, 200, 429]
    assert r.json()["error"]["type"] == "rate_limit_error" and "Retry-After" in r.headers


async def test_a_request_a_peer_region_admitted_needs_no_key_here(
    keyed: tuple[httpx.AsyncClient, dict[str, str], OpenAIRoutes],
) -> None:
    from starlette.requests import Request

    _, _, routes = keyed
    body = b'{"model": "echo", "messages": [{"role": "user", "content": "hi"}]}'
    scope = post_scope("/v1/chat/completions", body)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    assert (await routes(Request(scope, receive))).status_code == 401
    assert (await routes(Request(scope, receive), trusted=True)).status_code == 200
