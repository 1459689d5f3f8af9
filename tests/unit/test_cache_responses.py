"""The inference response cache without Ray: which requests are cached, under which key, the
opt-outs, and the X-Cache header on the HTTP routes (L1-only cache in front of the echo model)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from app.api.http import OpenAIRoutes
from app.api.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from app.cache.client import Cache
from app.cache.config import CacheConfig, CacheConfigError, ResponseCachePolicy
from app.cache.policy import bypass_requested, is_deterministic, response_key
from app.cache.responses import ResponseCache
from app.catalog.cards import ModelCard
from app.serving.runners.echo import EchoRunner
from app.serving.service import ModelService
from tests.unit.test_http import EchoBackend

CARD = ModelCard(id="echo", task="text-generation", loader="echo")
HELLO = [{"role": "user", "content": "hello"}]


def chat(**extra: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "echo", "messages": HELLO} | extra)


def test_only_deterministic_requests_are_cacheable() -> None:
    assert is_deterministic(chat(temperature=0))
    assert not is_deterministic(chat())  # OpenAI's default temperature is 1
    assert not is_deterministic(chat(temperature=0.7, seed=3))
    assert is_deterministic(EmbeddingRequest(model="m", input="x"))
    assert not is_deterministic(CompletionRequest(model="m", prompt="x"))


def test_key_ignores_delivery_and_unknown_fields_but_not_parameters() -> None:
    base = response_key("chat", CARD, chat(temperature=0))
    assert base.startswith("resp:echo:fp-") and ":chat:" in base
    assert response_key("chat", CARD, chat(temperature=0, user="u1", stream=False)) == base
    assert response_key("chat", CARD, chat(temperature=0, cache_bypass=True)) == base
    assert response_key("chat", CARD, chat(temperature=0, max_tokens=3)) != base
    assert response_key("completions", CARD, chat(temperature=0)) != base
    pinned = CARD.model_copy(update={"revision": "v2"})
    assert response_key("chat", pinned, chat(temperature=0)).startswith("resp:echo:v2:chat:")


@pytest.mark.parametrize(
    ("headers", "bypass"),
    [
        ({"cache-control": "no-cache"}, True),
        ({"cache-control": "max-age=0, no-store"}, True),
        ({"x-cache-bypass": "1"}, True),
        ({"x-cache-bypass": "0"}, False),
        ({"cache-control": "max-age=60"}, False),
        ({}, False),
    ],
)
def test_bypass_headers(headers: dict[str, str], bypass: bool) -> None:
    assert bypass_requested(headers) is bypass


def test_config_from_env_names_the_variable() -> None:
    config = CacheConfig.from_env({"APP_CACHE_TIERS": "actors,redis", "APP_CACHE_NUM_SHARDS": "4"})
    assert [t.value for t in config.tiers] == ["actors", "redis"] and config.num_shards == 4
    with pytest.raises(CacheConfigError, match="APP_CACHE_NUM_SHARDS"):
        CacheConfig.from_env({"APP_CACHE_NUM_SHARDS": "zero"})
    with pytest.raises(CacheConfigError, match="tiers"):
        CacheConfig.from_env({"APP_CACHE_TIERS": "memcached"})


def test_card_and_env_switch_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ResponseCache.for_card(CARD) is not None
    image = ModelCard(id="img", task="text-to-image", loader="diffusers-stable-diffusion")
    assert ResponseCache.for_card(image) is None
    off = CARD.model_copy(update={"response_cache": ResponseCachePolicy(enabled=False)})
    assert ResponseCache.for_card(off) is None
    monkeypatch.setenv("APP_RESPONSE_CACHE", "0")
    assert ResponseCache.for_card(CARD) is None


class CountingRunner(EchoRunner):
    calls = 0

    def generate(self, requests):  # type: ignore[no-untyped-def]
        CountingRunner.calls += 1
        return super().generate(requests)


class CachedEchoBackend(EchoBackend):
    def __init__(self) -> None:
        super().__init__()
        runner = CountingRunner(CARD, None)
        runner.load()
        cache = ResponseCache(CARD, Cache(CacheConfig(), tiers=[]), ResponseCachePolicy())
        self.service = ModelService(CARD, runner, response_cache=cache)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=OpenAIRoutes(CachedEchoBackend()).asgi)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


async def test_x_cache_header_hit_miss_bypass(client: httpx.AsyncClient) -> None:
    CountingRunner.calls = 0
    body = {"model": "echo", "messages": HELLO, "temperature": 0}
    first = await client.post("/v1/chat/completions", json=body)
    second = await client.post("/v1/chat/completions", json=body)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert "x_cache" not in second.json()
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["id"] != first.json()["id"]
    assert CountingRunner.calls == 1
    opted_out = await client.post(
        "/v1/chat/completions", json=body, headers={"Cache-Control": "no-cache"}
    )
    sampled = await client.post("/v1/chat/completions", json=body | {"temperature": 0.5})
    field = await client.post("/v1/chat/completions", json=body | {"cache_bypass": True})
    assert [r.headers["x-cache"] for r in (opted_out, sampled, field)] == ["bypass"] * 3
    assert CountingRunner.calls == 4
    stream = await client.post("/v1/chat/completions", json=body | {"stream": True})
    assert stream.status_code == 200 and "x-cache" not in stream.headers
