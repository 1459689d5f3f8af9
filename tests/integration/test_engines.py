"""The card's `engine:` on real Ray Serve: tiny-llama's card (auto: continuous on a CPU) and a
copy set to static give the same greedy text over HTTP (OpenAI's client on each model's URL)
and through handles, each replica reports its engine, and a continuous replica whose KV budget
is full refuses over HTTP with a 429, an OpenAI error body and Retry-After."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from app.api.schemas import CompletionRequest
from app.catalog.cards import ModelCard, load_catalogue
from tests.integration.conftest import ROOT

STATIC = "engine-static"
TIGHT = "engine-tight"


def _card(model_id: str, engine: dict[str, Any]) -> ModelCard:
    base = load_catalogue(ROOT / "models").get("tiny-llama")
    assert base is not None
    one = {"id": model_id, "replicas": {"min": 1, "max": 1}, "engine": engine}
    # The tight card: room for one long sequence (2 x 85 positions do not fit 100), no waiting.
    return ModelCard.model_validate(base.model_dump(mode="json") | one)


CARDS = [
    _card(STATIC, {"kind": "static"}),
    _card(TIGHT, {"kind": "continuous", "kv_cache_tokens": 100, "max_waiting": 0}),
]


@pytest.fixture(scope="module")
def base(serving: str) -> Iterator[str]:
    from ray import serve

    from app.serving.builder import model_application
    from app.serving.deploy import wait_running

    catalogue = load_catalogue(ROOT / "models")
    for card in CARDS:
        app = model_application(card, catalogue.directory)
        serve.run(app, name=card.deployment_name, route_prefix=f"/models/{card.id}", blocking=False)
    try:
        wait_running([card.deployment_name for card in CARDS], timeout_s=300)
        yield serving
    finally:
        for card in CARDS:
            serve.delete(card.deployment_name)


def _api(base: str, model: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{base}/models/{model}/v1", api_key="unused", max_retries=0, timeout=120
    )


def _stats(app: str) -> dict[str, Any]:
    from ray import serve

    result: dict[str, Any] = serve.get_app_handle(app).stats.remote().result()
    return result


def test_both_engines_give_the_same_greedy_text(base: str) -> None:
    from ray import serve

    prompts = ["Once upon a time", "The weather is nice today", "Hello"]
    texts = {}
    for model in ("tiny-llama", STATIC):
        api = _api(base, model)
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            replies = list(
                pool.map(
                    lambda p, api=api, model=model: api.completions.create(
                        model=model, prompt=p, max_tokens=12, temperature=0
                    ),
                    prompts,
                )
            )
        texts[model] = [r.choices[0].text for r in replies]
        assert all(r.usage is not None and r.usage.completion_tokens == 12 for r in replies)
    assert texts["tiny-llama"] == texts[STATIC]
    assert len(set(texts[STATIC])) == len(prompts)
    # Through handles, as another Ray job calls them.
    for model, app in (("tiny-llama", "model-tiny-llama"), (STATIC, f"model-{STATIC}")):
        request = CompletionRequest(model=model, prompt=prompts[0], max_tokens=12, temperature=0)
        reply = serve.get_app_handle(app).completions.remote(request).result()
        assert reply["choices"][0]["text"] == texts[STATIC][0]


def test_replicas_report_their_engine(base: str) -> None:
    from ray import serve

    assert _stats("model-tiny-llama")["engine"]["engine"] == "continuous"
    health = serve.get_app_handle("model-tiny-llama").health.remote().result()
    assert health["engine"]["engine"] == "continuous" and health["engine"]["running"] >= 0
    static = _stats(f"model-{STATIC}")["engine"]
    assert static["engine"] == "static" and "kv_cache_tokens" not in static
    tight = _stats(f"model-{TIGHT}")["engine"]
    assert tight["engine"] == "continuous" and tight["kv_cache_tokens"] == 100


def test_a_full_kv_budget_is_a_429_with_retry_after(base: str) -> None:
    url = f"{base}/models/{TIGHT}/v1/completions"
    body = {"model": TIGHT, "max_tokens": 80, "temperature": 0}

    def post(i: int) -> httpx.Response:
        # Distinct prompts: identical greedy requests would be answered by the response cache.
        return httpx.post(url, json=body | {"prompt": f"Once upon a time {i}"}, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, range(8)))
    codes = sorted(a.status_code for a in answers)
    assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
    refused = next(a for a in answers if a.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and "KV cache" in error["message"]
    # Too large for the whole cache: a 400 naming max_tokens, not a wait or a 500.
    too_big = httpx.post(url, json=body | {"prompt": "Hello", "max_tokens": 200}, timeout=60)
    assert too_big.status_code == 400
    assert too_big.json()["error"]["param"] == "max_tokens"
