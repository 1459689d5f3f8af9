"""API keys on real Ray Serve: keys in the region's KV store, checked on a model's own URL (through
HAProxy to its replicas), on the gateway's base URL and over handles, with a per-key request
limit that holds across two replicas (app.security)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import ray

from app.api.errors import AuthenticationError
from app.api.schemas import ChatCompletionRequest
from app.catalog.cards import ModelCard
from app.client import InferenceClient
from app.fleet.router_actor import ensure_router, stop_router
from app.fleet.spec import FleetSpec, Region
from app.security.cli import create, revoke
from app.security.config import Auth, AuthMode
from app.security.keys import KeyLimits, Scope, key_id_of
from tests.integration.support import deploy_with_gateway

pytestmark = pytest.mark.integration

MODEL = "keyed-echo"
SPEC = FleetSpec(
    regions={
        "local": Region(latitude=0.0, longitude=0.0, models={MODEL: 2})  # type: ignore[dict-item]
    },
    default_region="local",
    auth=Auth(mode=AuthMode.KEYS, key_cache_s=1),
    router_actor="keys-router-tests",
).for_region("local")
CARD = ModelCard(
    id=MODEL,
    task="text-generation",
    loader="echo",
    resources={"num_cpus": 0.1},  # type: ignore[arg-type]
)


@dataclass
class Keyed:
    model_url: str
    gateway_url: str
    keys: dict[str, str]
    kv: Any


@pytest.fixture(scope="module")
def keyed(ray_cluster: Any, serving: str) -> Iterator[Keyed]:
    from ray import serve

    from app.kv import KVClient, KVConfig, shutdown_kv, start_kv

    start_kv(KVConfig())
    kv = KVClient.connect()
    ensure_router(SPEC)
    keys = {
        "user": create(kv, "user", (Scope.INFERENCE,), KeyLimits()),
        "admin": create(kv, "ops", (Scope.ADMIN,), KeyLimits()),
        "limited": create(kv, "batch", (Scope.INFERENCE,), KeyLimits(requests_per_minute=6)),
    }
    deploy_with_gateway(CARD, SPEC, "keyed-gateway", "/keyed")
    try:
        yield Keyed(
            model_url=f"{serving}/models/{MODEL}/v1",
            gateway_url=f"{serving}/keyed/v1",
            keys=keys,
            kv=kv,
        )
    finally:
        serve.delete("keyed-gateway")
        serve.delete(CARD.deployment_name)
        stop_router(SPEC.router_actor)
        shutdown_kv()


def chat(url: str, key: str | None) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "who goes there"}]}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/chat/completions", json=body, headers=headers, timeout=60)


@pytest.mark.parametrize("base", ["model_url", "gateway_url"])
def test_both_base_urls_ask_for_a_key(keyed: Keyed, base: str) -> None:
    url = getattr(keyed, base)
    bare = chat(url, None)
    assert bare.status_code == 401, bare.text
    assert bare.json()["error"]["code"] == "invalid_api_key"
    assert chat(url, "sk-app-000000000000_" + "x" * 32).status_code == 401
    ok = chat(url, keyed.keys["user"])
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["message"]["content"] == "who goes there"


def test_fleet_view_needs_the_admin_scope(keyed: Keyed) -> None:
    def fleet(key: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.get(f"{keyed.gateway_url}/fleet", headers=headers, timeout=30)

    denied = fleet(keyed.keys["user"])
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "insufficient_scope"
    assert fleet(keyed.keys["admin"]).status_code == 200


def test_a_request_limit_holds_across_two_replicas(keyed: Keyed) -> None:
    served = [chat(keyed.model_url, keyed.keys["limited"]) for _ in range(10)]
    codes = Counter(r.status_code for r in served)
    # Six requests in the minute, whichever of the two replicas took them; unless the minute
    # turned during the loop, which gives at most six more.
    assert codes[200] in range(6, 13) and codes[200] + codes[429] == 10, codes
    refused = next(r for r in served if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-limit-requests"] == "6"
    replicas = {r.json()["system_fingerprint"] for r in served if r.status_code == 200}
    assert len(replicas) == 2, replicas  # both replicas served, and the limit still held


def test_a_handle_caller_giving_a_key_is_checked(keyed: Keyed) -> None:
    from ray import serve

    handle = serve.get_deployment_handle(CARD.deployment_name, CARD.deployment_name)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(AuthenticationError):
        handle.chat.remote(body, api_key="sk-app-000000000000_" + "x" * 32).result()
    assert handle.chat.remote(body, api_key=keyed.keys["user"]).result()["choices"]
    assert handle.chat.remote(body).result()["choices"]  # in-cluster callers without a key
    request = ChatCompletionRequest.model_validate(body)
    assert InferenceClient(fleet=SPEC, api_key=keyed.keys["user"]).chat(request)["choices"]
    with pytest.raises(AuthenticationError):
        InferenceClient(fleet=SPEC, api_key="sk-app-000000000000_" + "y" * 32).chat(request)


def test_a_revoked_key_is_refused_within_the_cache_period(keyed: Keyed) -> None:
    key = create(keyed.kv, "short-lived", (Scope.INFERENCE,), KeyLimits())
    assert chat(keyed.model_url, key).status_code == 200
    key_id = key_id_of(key)
    assert key_id is not None
    revoke(keyed.kv, key_id)
    import time

    # Each replica trusts its cached record for key_cache_s (1 s here): once that has passed
    # on both, every request is refused.
    time.sleep(SPEC.auth.key_cache_s + 0.5)
    codes = [chat(keyed.model_url, key).status_code for _ in range(6)]
    assert codes == [401] * 6, codes
    assert ray.is_initialized()
