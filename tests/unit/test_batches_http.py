"""app.batches.http and multipart over ASGI: uploads parsed as they stream (400 for a missing
field, 413 over the limit), routes, paging and ownership, and the official openai client
driving files and batches end to end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import orjson
import pytest
from starlette.requests import Request

from app.batches.files import FileLimits
from app.batches.http import BatchRoutes, handles
from app.batches.workflow import WORKFLOW, start_input
from tests.unit.test_batches_workflow import World, line

try:  # the openai client's HTTP library: httpx2 in recent releases, httpx before
    import httpx2 as openai_httpx
except ImportError:  # pragma: no cover
    openai_httpx = httpx  # type: ignore[no-redef]

LINES = b"".join(orjson.dumps(line(c, c)) + b"\n" for c in "abc")


async def identify(request: Request) -> str | None:
    """Tests pass the key id as the bearer token; the gateway's Guard does it for real."""
    auth = request.headers.get("authorization", "")
    return auth.removeprefix("Bearer ") or None


class App:
    def __init__(self, tmp_path: Path, *, autorun: bool = True) -> None:
        self.world = World(tmp_path)
        self.autorun = autorun
        self.routes = BatchRoutes(
            self.world.files, self.world.batches, self.start, identify=identify
        )

    async def start(self, batch_id: str) -> None:
        self.world.engine.start(WORKFLOW, start_input(batch_id), run_id=batch_id)
        if self.autorun:  # the whole batch, before the create call answers
            await asyncio.to_thread(self.world.engine.run, batch_id)

    def client(self, key: str = "k1") -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.routes.asgi)
        headers = {"authorization": f"Bearer {key}"}
        return httpx.AsyncClient(transport=transport, base_url="http://t", headers=headers)


@pytest.fixture
def app(tmp_path: Path) -> App:
    return App(tmp_path)


async def upload(client: httpx.AsyncClient, data: bytes = LINES, **form: str) -> httpx.Response:
    fields = {"purpose": "batch"} | form
    return await client.post("/v1/files", data=fields, files={"file": ("in.jsonl", data)})


async def test_upload_then_read_back(app: App) -> None:
    async with app.client() as c:
        r = await upload(c)
        assert r.status_code == 200, r.text
        file = r.json()
        assert file["object"] == "file" and file["bytes"] == len(LINES)
        assert (await c.get(f"/v1/files/{file['id']}")).json() == file
        content = await c.get(f"/v1/files/{file['id']}/content")
        assert content.content == LINES
        assert (await c.get("/v1/files")).json() == {
            "object": "list",
            "data": [file],
            "first_id": file["id"],
            "last_id": file["id"],
            "has_more": False,
        }


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"data": {}, "files": {"file": ("in.jsonl", LINES)}}, "purpose"),
        ({"data": {"purpose": "batch"}}, "file"),
        ({"data": {"purpose": "assistants"}, "files": {"file": ("a", LINES)}}, "purpose"),
    ],
)
async def test_missing_or_bad_fields_are_400(app: App, kwargs: dict, param: str) -> None:
    async with app.client() as c:
        if "files" not in kwargs:  # a form without a file part is still multipart
            kwargs["files"] = {"other": ("x", b"1")}
        r = await c.post("/v1/files", **kwargs)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param
    assert app.world.files.list("k1") == ([], False)


async def test_a_body_that_is_not_multipart_is_400(app: App) -> None:
    async with app.client() as c:
        r = await c.post("/v1/files", json={"purpose": "batch"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_multipart"


async def test_the_purpose_may_follow_the_file(app: App) -> None:
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="late.jsonl"\r\n'
        b"Content-Type: application/jsonl\r\n\r\n" + LINES + b"\r\n"
        b'--XyZ\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--XyZ--\r\n'
    )
    headers = {"content-type": "multipart/form-data; boundary=XyZ"}
    async with app.client() as c:
        r = await c.post("/v1/files", content=body, headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["filename"] == "late.jsonl" and r.json()["bytes"] == len(LINES)
        truncated = body[: len(body) // 2]
        r = await c.post("/v1/files", content=truncated, headers=headers)
        assert r.status_code == 400
    assert len(app.world.files.list("k1")[0]) == 1


async def test_oversized_uploads_are_413(app: App) -> None:
    app.world.files.limits = FileLimits(max_bytes=1000)
    async with app.client() as c:
        r = await upload(c, b"x" * 2000)  # refused while streaming
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "request_too_large"
        r = await upload(c, b"x" * 200_000)  # refused from Content-Length alone
        assert r.status_code == 413

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length at all
            yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\n'
            for _ in range(10):
                yield b"y" * 500
            yield b"\r\n--B--\r\n"

        headers = {"content-type": "multipart/form-data; boundary=B"}
        r = await c.post("/v1/files", content=chunked(), headers=headers)
        assert r.status_code == 413
    assert app.world.files.list("k1") == ([], False)
    assert list((app.world.files.content.root).iterdir()) == []  # type: ignore[attr-defined]


async def test_paging_and_bad_params(app: App) -> None:
    async with app.client() as c:
        ids = []
        for _ in range(5):
            app.world.clock.advance(1)
            ids.append((await upload(c)).json()["id"])
        page = (await c.get("/v1/files", params={"limit": 2, "order": "asc"})).json()
        assert [f["id"] for f in page["data"]] == ids[:2] and page["has_more"]
        page = (await c.get("/v1/files", params={"after": page["last_id"], "order": "asc"})).json()
        assert [f["id"] for f in page["data"]] == ids[2:] and not page["has_more"]
        for params in ({"limit": 0}, {"limit": "x"}, {"order": "up"}, {"after": "file-x"}):
            r = await c.get("/v1/files", params=params)
            assert r.status_code == 400, params
        assert (await c.get("/v1/batches", params={"limit": 101})).status_code == 400


async def test_other_keys_see_404_and_unknown_routes(app: App) -> None:
    async with app.client("k1") as c1, app.client("k2") as c2:
        file = (await upload(c1)).json()
        for path in (f"/v1/files/{file['id']}", f"/v1/files/{file['id']}/content"):
            assert (await c2.get(path)).status_code == 404
        assert (await c2.delete(f"/v1/files/{file['id']}")).status_code == 404
        req = {"input_file_id": file["id"], "endpoint": "/v1/chat/completions"}
        r = await c2.post("/v1/batches", json=req | {"completion_window": "24h"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input_file_id"
        assert (await c1.get("/v1/batches/batch_nope")).status_code == 404
        assert (await c1.put("/v1/files")).status_code == 405
        assert (await c1.get("/v1/files/a/b/c")).status_code == 404
        r = await c1.post("/v1/batches", json=req | {"completion_window": "48h"})
        assert r.json()["error"]["param"] == "completion_window"
    assert handles("/v1/files/x/content") and handles("/v1/batches")
    assert not handles("/v1/filesystem") and not handles("/v1/chat/completions")


async def test_deleting_an_input_file_in_use_is_409(tmp_path: Path) -> None:
    app = App(tmp_path, autorun=False)
    async with app.client() as c:
        file = (await upload(c)).json()
        req = {"input_file_id": file["id"], "endpoint": "/v1/chat/completions"}
        batch = (await c.post("/v1/batches", json=req | {"completion_window": "24h"})).json()
        r = await c.delete(f"/v1/files/{file['id']}")
        assert r.status_code == 409 and batch["id"] in r.json()["error"]["message"]
        await asyncio.to_thread(app.world.engine.run, batch["id"])
        r = await c.delete(f"/v1/files/{file['id']}")
        assert r.json() == {"id": file["id"], "object": "file", "deleted": True}


def openai_client(app: App, key: str = "k1") -> openai.AsyncOpenAI:
    transport = openai_httpx.ASGITransport(app=app.routes.asgi)
    return openai.AsyncOpenAI(
        api_key=key,
        base_url="http://gateway/v1",
        http_client=openai_httpx.AsyncClient(transport=transport),
        max_retries=0,
    )


async def test_the_openai_client_runs_a_batch(app: App) -> None:
    client = openai_client(app)
    file = await client.files.create(file=("requests.jsonl", LINES), purpose="batch")
    assert file.purpose == "batch" and file.bytes == len(LINES)
    created = await client.batches.create(
        input_file_id=file.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert created.status == "validating" and created.metadata == {"job": "nightly"}
    batch = await client.batches.retrieve(created.id)
    assert batch.status == "completed" and batch.output_file_id
    assert batch.request_counts is not None and batch.request_counts.completed == 3
    listed = [b.id async for b in client.batches.list(limit=1)]
    assert listed == [created.id]
    content = await client.files.content(batch.output_file_id)
    rows = [orjson.loads(x) for x in content.text.splitlines()]
    assert [(r["custom_id"], r["response"]["body"]["echo"]) for r in rows] == [
        ("a", "a"),
        ("b", "b"),
        ("c", "c"),
    ]
    files = [f.id async for f in client.files.list()]
    assert set(files) == {file.id, batch.output_file_id}
    with pytest.raises(openai.ConflictError):
        await client.batches.cancel(created.id)
    with pytest.raises(openai.NotFoundError):
        await openai_client(app, "k2").batches.retrieve(created.id)
    deleted = await client.files.delete(batch.output_file_id)
    assert deleted.deleted


async def test_the_openai_client_cancels_a_batch(tmp_path: Path) -> None:
    app = App(tmp_path, autorun=False)
    client = openai_client(app)
    file = await client.files.create(file=("requests.jsonl", LINES), purpose="batch")
    created = await client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    cancelling = await client.batches.cancel(created.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    await asyncio.to_thread(app.world.engine.run, created.id)
    batch = await client.batches.retrieve(created.id)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    with pytest.raises(openai.BadRequestError):
        await client.files.create(file=("x.jsonl", LINES), purpose="fine-tune")
