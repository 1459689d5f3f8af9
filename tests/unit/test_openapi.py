"""The API description (app.api.openapi): every route either base URL answers is described (the
gateway's Files and Batch routes included), the document validates as OpenAPI 3.1,
/openapi.json and /docs answer without a key on both base URLs, and the response models
(app.api.openapi_models) accept what the service really sends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from referencing.exceptions import Unresolvable
from starlette.requests import Request
from starlette.responses import Response

import app.api.openapi
from app.api import openapi_models as out
from app.api.errors import (
    APIError,
    AuthenticationError,
    InvalidRequestError,
    OverloadedError,
    RateLimitError,
    RequestTimeoutError,
    ServiceUnavailableError,
)
from app.api.http import OpenAIRoutes, json_response
from app.api.openapi import OPERATIONS, Route, RouteDescriptionError, build_document
from app.api.openapi_docs import docs_html
from app.api.schemas import EmbeddingRequest
from app.batches.http import handles
from app.batches.multipart import FIELDS
from app.catalog.cards import ModelCard
from app.events.http import DEFAULT_TIMEOUT_S, MAX_LIMIT, MAX_TIMEOUT_S
from app.regions.forwarding import SUMMARY_PATH
from app.regions.summary import ModelLoad, RegionSummary
from app.security.keys import Scope
from app.serving.batching import LocalBatcher
from app.serving.runners.base import EmbeddingRunner, LoadedInfo
from app.serving.service import ModelService
from tests.unit.test_batches_http import App as BatchApp
from tests.unit.test_batches_http import upload
from tests.unit.test_fleet_router_actor import SPEC, StaticNodesRouter, report
from tests.unit.test_http import EchoBackend, chat
from tests.unit.test_security import Clock, Keys, guard
from tests.unit.test_service_limits import image, image_service


def model_routes(auth: bool = False) -> OpenAIRoutes:
    """A model's own URL, as a replica serves it (keys checked when `auth`)."""
    return OpenAIRoutes(EchoBackend(), guard(Keys(), Clock()) if auth else None)


def gateway_routes() -> OpenAIRoutes:
    """The gateway's route table, with the admin and peer routes it adds and the Files and
    Batch routes it answers first: the real class, built without Ray (no handle, Serve or KV
    call happens until a request comes)."""
    from app.serving.gateway import Gateway

    gateway = Gateway([{"id": "echo", "task": "text-generation", "loader": "echo"}])
    return gateway._routes


def client(routes: OpenAIRoutes, root_path: str = "") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=routes.asgi, root_path=root_path)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def described(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, item in document["paths"].items() for m in item}


async def no_content(request: Request) -> Response:
    return json_response({})


# ---- coverage and validity ------------------------------------------------------------------


@pytest.mark.parametrize("make", [model_routes, gateway_routes], ids=["model", "gateway"])
def test_every_route_the_service_answers_is_described(make: Any) -> None:
    routes = make()
    table = {(r.method, r.path) for r in routes.route_table()}
    assert described(routes.description.document()) == table


def test_the_registry_describes_exactly_the_routes_of_both_base_urls() -> None:
    gateway = {(r.method, r.path) for r in gateway_routes().route_table()}
    model = {(r.method, r.path) for r in model_routes().route_table()}
    assert {("GET", "/v1/fleet"), ("GET", SUMMARY_PATH)} <= gateway - model
    assert {("DELETE", "/v1/files/{file_id}"), ("POST", "/v1/batches")} <= gateway - model
    assert gateway | model == set(OPERATIONS)  # no entry describes a route nobody serves


async def test_every_files_and_batches_route_in_the_gateway_table_is_answered(
    tmp_path: Path,
) -> None:
    """The described paths are the ones BatchRoutes dispatches: none is a 'no route' or 405."""
    routes = [r for r in gateway_routes().route_table() if handles(r.path)]
    assert len(routes) == 9 and {r.scope for r in routes} == {Scope.INFERENCE}
    async with BatchApp(tmp_path).client() as c:
        for route in routes:
            path = route.path.format(file_id="file-x", batch_id="batch_x")
            response = await c.request(route.method, path, json={})
            message = response.json().get("error", {}).get("message", "")
            assert response.status_code != 405 and not message.startswith("no route"), route


async def test_every_route_in_the_table_is_answered() -> None:
    """The table is what the dispatcher serves: no route in it is a 'no route' 404."""
    routes = model_routes()
    async with client(routes) as c:
        for route in routes.route_table():
            path = route.path.replace("{model}", "echo")
            response = await c.request(route.method, path, content=b"{}")
            assert response.status_code != 404, (route, response.text)


@pytest.mark.parametrize("auth", [False, True], ids=["keys-off", "keys-on"])
@pytest.mark.parametrize("make", [model_routes, gateway_routes], ids=["model", "gateway"])
def test_the_document_validates_as_openapi_3_1(make: Any, auth: bool) -> None:
    document = build_document(make().route_table(), auth=auth, server_url="/models/echo")
    validate(document, cls=OpenAPIV31SpecValidator)
    assert document["openapi"].startswith("3.1")
    assert [server["url"] for server in document["servers"]] == ["/models/echo"]
    chat_op = document["paths"]["/v1/chat/completions"]["post"]
    assert chat_op["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"
    }
    assert set(chat_op["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "ChatCompletionChunk" in document["components"]["schemas"]
    health = document["paths"]["/healthz"]["get"]
    assert health["security"] == [] and "401" not in health["responses"]
    assert (chat_op["security"] == [{"apiKey": []}]) is auth
    assert ("401" in chat_op["responses"] and "403" in chat_op["responses"]) is auth
    assert ("apiKey" in document["components"].get("securitySchemes", {})) is auth
    if make is gateway_routes:
        upload_op = document["paths"]["/v1/files"]["post"]
        assert set(upload_op["requestBody"]["content"]) == {"multipart/form-data"}
        assert "409" in document["paths"]["/v1/files/{file_id}"]["delete"]["responses"]
        assert 'class="m delete"' in docs_html(document)


def test_the_validator_rejects_a_broken_document() -> None:
    """The check above is not vacuous: a malformed parameter and a dangling reference fail it."""
    document = build_document(model_routes().route_table(), auth=True)
    document["paths"]["/v1/models"]["get"]["parameters"] = [{"name": "x"}]
    with pytest.raises(OpenAPIValidationError, match="'in' is a required property"):
        validate(document, cls=OpenAPIV31SpecValidator)
    document = build_document(model_routes().route_table(), auth=True)
    del document["components"]["schemas"]["ChatCompletion"]
    with pytest.raises(Unresolvable, match="ChatCompletion"):
        validate(document, cls=OpenAPIV31SpecValidator)


def test_keyed_operations_name_their_scope_and_limits() -> None:
    document = build_document(gateway_routes().route_table(), auth=True)
    fleet = document["paths"]["/v1/fleet"]["get"]
    assert fleet["x-scope"] == "admin" and fleet["security"] == [{"apiKey": []}]
    summary = document["paths"][SUMMARY_PATH]["get"]
    assert summary["security"] == [{"federationSignature": []}] and "x-scope" not in summary
    chat_ok = document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]
    assert {"X-Cache", "x-ratelimit-remaining-tokens"} <= set(chat_ok["headers"])
    limited = document["components"]["responses"]["TooManyRequests"]
    assert "Retry-After" in limited["headers"]


# ---- a missing or wrong description is an error ---------------------------------------------


def test_a_route_without_a_registry_entry_raises() -> None:
    operations = dict(OPERATIONS)
    del operations[("POST", "/v1/embeddings")]
    with pytest.raises(RouteDescriptionError, match=r"POST /v1/embeddings .*OPERATIONS"):
        build_document(model_routes().route_table(), auth=False, operations=operations)


def test_an_added_route_must_be_described_with_its_scope() -> None:
    routes = model_routes()
    routes.add_get("/v1/secrets", no_content)
    with pytest.raises(RouteDescriptionError, match="GET /v1/secrets"):
        routes.description.document()
    routes = model_routes()
    routes.add_get("/v1/fleet", no_content, scope=None)  # described as admin-only
    with pytest.raises(RouteDescriptionError, match="scope"):
        routes.description.document()


# ---- served over HTTP -----------------------------------------------------------------------


@pytest.mark.parametrize("root_path", ["", "/models/echo"], ids=["gateway-url", "model-url"])
async def test_openapi_json_and_docs_answer_without_a_key(root_path: str) -> None:
    routes = model_routes(auth=True)
    async with client(routes, root_path) as c:
        assert (await c.get(f"{root_path}/v1/models")).status_code == 401
        spec = await c.get(f"{root_path}/openapi.json")
        page = await c.get(f"{root_path}/docs")
    assert spec.status_code == 200 and spec.headers["content-type"] == "application/json"
    assert spec.json()["servers"][0]["url"] == (root_path or "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert html.startswith("<!doctype html>") and "<script" not in html
    assert "http://" not in html and "https://" not in html  # nothing to fetch: no internet
    for op in ("createChatCompletion", "listModels", "retrieveModel", "health"):
        assert f'id="op-{op}"' in html
    assert 'id="schema-ChatCompletionRequest"' in html and 'href="#schema-ChatMessage"' in html


async def test_the_document_is_built_once_and_again_after_add_get_or_describe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    builds: list[int] = []
    real = app.api.openapi.build_document

    def counting(*args: Any, **kwargs: Any) -> dict[str, Any]:
        builds.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(app.api.openapi, "build_document", counting)
    routes = model_routes()
    async with client(routes) as c:
        first = (await c.get("/openapi.json")).content
        assert (await c.get("/openapi.json")).content == first
        assert (await c.get("/docs")).status_code == 200
        assert len(builds) == 1
        routes.add_get("/v1/fleet", no_content)
        paths = (await c.get("/openapi.json")).json()["paths"]
        assert "/v1/fleet" in paths and len(builds) == 2
        routes.describe([Route("GET", "/v1/batches", Scope.INFERENCE)])
        paths = (await c.get("/openapi.json")).json()["paths"]
    assert "/v1/batches" in paths and len(builds) == 3


# ---- parameters as the code checks them -----------------------------------------------------


def schemas_of(method: str, path: str) -> dict[str, dict[str, Any]]:
    return {p["name"]: p["schema"] for p in OPERATIONS[(method, path)].params}


async def test_list_parameters_are_the_bounds_the_routes_check(tmp_path: Path) -> None:
    async with BatchApp(tmp_path).client() as c:
        for path in ("/v1/files", "/v1/batches"):
            params = schemas_of("GET", path)
            limit = params["limit"]
            assert (await c.get(path, params={"limit": limit["maximum"]})).status_code == 200
            for bad in (limit["minimum"] - 1, limit["maximum"] + 1):
                assert (await c.get(path, params={"limit": bad})).status_code == 400, path
            for order in params.get("order", {}).get("enum", []):
                assert (await c.get(path, params={"order": order})).status_code == 200
    events = schemas_of("GET", "/v1/events")
    assert events["limit"]["maximum"] == MAX_LIMIT
    assert (events["timeout_s"]["maximum"], events["timeout_s"]["default"]) == (
        MAX_TIMEOUT_S,
        DEFAULT_TIMEOUT_S,
    )


def test_the_upload_form_names_the_fields_the_parser_reads() -> None:
    names = {field.alias or name for name, field in out.FileUpload.model_fields.items()}
    assert names == {"file", *FIELDS}


# ---- the response models accept real payloads ----------------------------------------------


def sse_events(body: bytes) -> list[dict[str, Any]]:
    data = [e.removeprefix(b"data: ") for e in body.split(b"\n\n") if e.startswith(b"data: ")]
    assert data[-1] == b"[DONE]"
    return [orjson.loads(d) for d in data[:-1]]


async def test_text_answers_and_chunks_match_their_models() -> None:
    usage = {"stream_options": {"include_usage": True}}
    completion = {"model": "echo", "prompt": ["a b c", "d e"], "echo": True, "n": 2}
    async with client(model_routes()) as c:
        unary = await c.post("/v1/chat/completions", json=chat(n=2))
        stream = await c.post("/v1/chat/completions", json=chat(n=2, stream=True, **usage))
        text = await c.post("/v1/completions", json=completion)
        text_stream = await c.post("/v1/completions", json=completion | {"stream": True} | usage)
    out.ChatCompletion.model_validate(unary.json())
    out.Completion.model_validate(text.json())
    for events, model in ((stream, out.ChatCompletionChunk), (text_stream, out.CompletionChunk)):
        chunks = sse_events(events.content)
        for chunk in chunks:
            model.model_validate(chunk)
        assert chunks[-1]["usage"] is not None


async def test_model_listing_and_errors_match_their_models() -> None:
    async with client(model_routes()) as c:
        listing = await c.get("/v1/models")
        one = await c.get("/v1/models/echo")
        missing = await c.get("/v1/models/nope")
        invalid = await c.post("/v1/chat/completions", json={"model": "echo"})
    out.ModelList.model_validate(listing.json())
    out.Model.model_validate(one.json())
    for error in (missing, invalid):
        out.ErrorResponse.model_validate(error.json())
    for cls in (InvalidRequestError, AuthenticationError, RateLimitError, OverloadedError,
                ServiceUnavailableError, RequestTimeoutError, APIError):  # fmt: skip
        out.ErrorResponse.model_validate(cls("why", param="p").body())


class FixedEmbeddings(EmbeddingRunner):
    """An embedding runner with no model: the same unit vector for every text."""

    def load(self) -> LoadedInfo:
        return LoadedInfo(device="cpu", dtype="none")

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    @property
    def dimensions(self) -> int:
        return 3

    @property
    def max_input_tokens(self) -> int:
        return 512

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return [[1.0, 0.0, 0.0] for _ in texts]


async def test_embeddings_and_images_match_their_models() -> None:
    card = ModelCard(id="vec", task="embedding", loader="sentence-transformers")
    service = ModelService(card, FixedEmbeddings(card, None), batcher=LocalBatcher(4, 0.0))
    for encoding in ("float", "base64"):
        request = EmbeddingRequest(model="vec", input=["a b", "c"], encoding_format=encoding)
        out.EmbeddingList.model_validate(await service.embeddings(request))
    out.ImagesResponse.model_validate(await image_service().images(image(n=2)))


@pytest.fixture
async def fleet_router() -> AsyncIterator[StaticNodesRouter]:
    router = StaticNodesRouter(SPEC.model_dump(mode="json"))
    await router.heartbeat(report("a", "n-eu", perf={"latency_ms": 2.0, "success_rate": 1.0}))
    yield router


async def test_fleet_view_and_region_summary_match_their_models(
    fleet_router: StaticNodesRouter,
) -> None:
    view = await fleet_router.fleet()
    view["autoscaling"] = None  # what the gateway adds without a KV store
    assert view["replicas"] and view["nodes"]
    out.FleetView.model_validate(view)
    summary = RegionSummary(
        "eu", models={"echo": ModelLoad(1, 1, 8, 2, 3.5, 0.99)}, generated_at=1.0
    )
    out.RegionSummary.model_validate(summary.to_json())


async def test_files_and_batches_match_their_models(tmp_path: Path) -> None:
    """What the real FileStore and BatchStore (over the FakeKV) answer through BatchRoutes: a
    batch created, cancelled, completed and failed, files listed, read and deleted, and 409s."""
    batches = BatchApp(tmp_path, autorun=False)
    world = batches.world
    async with batches.client() as c:

        async def batch(file_id: str, run: bool = True) -> dict[str, Any]:
            request = {"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                       "completion_window": "24h", "metadata": {"job": "nightly"}}  # fmt: skip
            created = (await c.post("/v1/batches", json=request)).json()
            if run:
                await asyncio.to_thread(world.engine.run, created["id"])
            return created

        file, gone = (await upload(c)).json(), (await upload(c)).json()
        created = await batch(file["id"], run=False)
        cancelling = (await c.post(f"/v1/batches/{created['id']}/cancel")).json()
        in_use = await c.delete(f"/v1/files/{file['id']}")
        await asyncio.to_thread(world.engine.run, created["id"])
        done = await batch(file["id"])
        failing = await batch(gone["id"], run=False)
        world.files.remove(gone["id"])  # expired before its batch validated it
        await asyncio.to_thread(world.engine.run, failing["id"])
        ids = (created["id"], done["id"], failing["id"])
        finished = [(await c.get(f"/v1/batches/{i}")).json() for i in ids]
        listing = (await c.get("/v1/batches", params={"limit": 2})).json()
        too_late = await c.post(f"/v1/batches/{done['id']}/cancel")
        files = (await c.get("/v1/files")).json()
        output_id = finished[1]["output_file_id"]
        content = await c.get(f"/v1/files/{output_id}/content")
        deleted = (await c.delete(f"/v1/files/{output_id}")).json()
        missing = await c.get(f"/v1/files/{output_id}")
    assert [b["status"] for b in finished] == ["cancelled", "completed", "failed"]
    assert finished[2]["errors"]["data"][0]["code"] == "file_not_found"
    for payload in (file, *files["data"]):
        out.FileObject.model_validate(payload)
    out.FileList.model_validate(files)
    out.FileDeleted.model_validate(deleted)
    for payload in (created, cancelling, done, *finished):
        out.Batch.model_validate(payload)
    out.BatchList.model_validate(listing)
    assert listing["has_more"] and len(files["data"]) == 2  # the input file and the output
    for error in (in_use, too_late, missing):
        out.ErrorResponse.model_validate(error.json())
    assert (in_use.status_code, too_late.status_code, missing.status_code) == (409, 409, 404)
    never_set = {k for k in out.Batch.model_fields if all(b[k] is None for b in finished)}
    assert never_set == {"error_file_id", "expired_at"}  # every other field had a real value
    document = build_document(gateway_routes().route_table(), auth=False)
    answer = document["paths"]["/v1/files/{file_id}/content"]["get"]["responses"]["200"]
    assert set(answer["content"]) == {content.headers["content-type"]}
