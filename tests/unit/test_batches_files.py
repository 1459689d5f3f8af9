"""app.batches.files and content: uploads and their limits, owner-only permissions, listing
order and paging (the KV scan is not in time order), ownership, pins and expiry."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from app.api.errors import InvalidRequestError, NotFoundError, RequestTooLargeError
from app.batches.content import FsspecContent, LocalContent, content_store
from app.batches.files import FileLimits, FileStore
from app.batches.records import ConflictError
from tests.unit.kv_fakes import FakeClock, FakeKV

LINE = b'{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}}\n'


def make_store(tmp_path: Path, **limits: object) -> tuple[FileStore, FakeClock]:
    clock = FakeClock()
    kv = FakeKV(clock)
    store = FileStore(
        kv, LocalContent(tmp_path / "files"), limits=FileLimits(**limits), clock=clock
    )
    return store, clock


def upload(store: FileStore, owner: str, data: bytes, purpose: str = "batch") -> dict:
    up = store.begin(owner, "in.jsonl")
    for i in range(0, len(data), 7):  # many small writes, as a streamed body arrives
        up.write(data[i : i + 7])
    return up.commit(purpose)


def test_upload_record_is_openai_file_object(tmp_path: Path) -> None:
    store, clock = make_store(tmp_path)
    file = upload(store, "k1", LINE * 3)
    assert file == {
        "id": file["id"],
        "object": "file",
        "bytes": len(LINE) * 3,
        "created_at": int(clock()),
        "filename": "in.jsonl",
        "purpose": "batch",
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }
    assert file["id"].startswith("file-")
    assert b"".join(store.content_chunks("k1", file["id"])) == LINE * 3
    assert store.get("k1", file["id"]) == file


def test_local_content_is_owner_only(tmp_path: Path) -> None:
    store, _ = make_store(tmp_path)
    file = upload(store, "k1", LINE)
    root = tmp_path / "files"
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(root / file["id"]).st_mode) == 0o600


def test_filename_keeps_only_its_last_path_part(tmp_path: Path) -> None:
    store, _ = make_store(tmp_path)
    up = store.begin("k1", "../../etc\\passwd")
    up.write(LINE)
    assert up.commit("batch")["filename"] == "passwd"


def test_over_the_size_limit_is_413_and_leaves_nothing(tmp_path: Path) -> None:
    store, _ = make_store(tmp_path, max_bytes=100)
    up = store.begin("k1", "big.jsonl")
    up.write(b"x" * 60)
    with pytest.raises(RequestTooLargeError):
        up.write(b"x" * 60)
    assert os.listdir(tmp_path / "files") == []
    assert store.list("k1") == ([], False)


@pytest.mark.parametrize(
    ("data", "purpose", "param"),
    [
        (LINE * 4, "batch", "file"),  # over max_lines (3)
        (LINE * 3 + b"{}", "batch", "file"),  # a last line without its newline counts
        (b"", "batch", "file"),  # empty
        (LINE, "fine-tune", "purpose"),
        (LINE, "batch_output", "purpose"),  # written by the service, never uploaded
    ],
)
def test_refused_uploads_are_400(tmp_path: Path, data: bytes, purpose: str, param: str) -> None:
    store, _ = make_store(tmp_path, max_lines=3)
    with pytest.raises(InvalidRequestError) as err:
        upload(store, "k1", data, purpose)
    assert err.value.param == param
    assert os.listdir(tmp_path / "files") == []


def test_exactly_max_lines_is_accepted(tmp_path: Path) -> None:
    store, _ = make_store(tmp_path, max_lines=3)
    assert upload(store, "k1", LINE * 3)["bytes"] == len(LINE) * 3


def test_another_owners_file_is_404(tmp_path: Path) -> None:
    store, _ = make_store(tmp_path)
    file = upload(store, "k1", LINE)
    for call in (store.get, store.content_chunks, store.delete):
        with pytest.raises(NotFoundError):
            call("k2", file["id"])
    assert store.list("k2") == ([], False)


def test_listing_is_by_time_with_paging_order_and_purpose(tmp_path: Path) -> None:
    store, clock = make_store(tmp_path)
    ids = []
    for i in range(7):
        clock.advance(40_000)  # several day buckets
        ids.append(upload(store, "k1", LINE)["id"])
        if i == 3:
            out = store.create("k1", "o.jsonl", "batch_output", [LINE], file_id=f"file-out{i}")
            ids.append(out["id"])
    upload(store, "k2", LINE)  # another owner's file never shows

    def walk(**kw: object) -> list[str]:
        seen, after = [], None
        while True:
            data, more = store.list("k1", after=after, limit=3, **kw)  # type: ignore[arg-type]
            seen += [f["id"] for f in data]
            if not more:
                return seen
            after = data[-1]["id"]

    assert walk(order="asc") == ids
    assert walk() == ids[::-1]  # newest first by default
    assert walk(purpose="batch_output") == ["file-out3"]
    assert len(walk(purpose="batch")) == 7
    with pytest.raises(InvalidRequestError):
        store.list("k1", after="file-nope")


def test_same_second_uploads_keep_a_stable_order(tmp_path: Path) -> None:
    store, _ = make_store(tmp_path)
    ids = {upload(store, "k1", LINE)["id"] for _ in range(5)}
    first, more = store.list("k1", limit=2)
    rest, _ = store.list("k1", after=first[-1]["id"])
    assert more and {f["id"] for f in first + rest} == ids


def test_delete_removes_metadata_content_and_listing(tmp_path: Path) -> None:
    store, _ = make_store(tmp_path)
    file = upload(store, "k1", LINE)
    assert store.delete("k1", file["id"]) == {"id": file["id"], "object": "file", "deleted": True}
    with pytest.raises(NotFoundError):
        store.get("k1", file["id"])
    assert os.listdir(tmp_path / "files") == []
    assert store.list("k1") == ([], False)


def test_a_pinned_file_cannot_be_deleted_until_unpinned(tmp_path: Path) -> None:
    store, _ = make_store(tmp_path)
    file = upload(store, "k1", LINE)
    store.pin("k1", file["id"], "batch_1")
    with pytest.raises(ConflictError) as err:
        store.delete("k1", file["id"])
    assert err.value.status == 409 and err.value.code == "file_in_use"
    store.unpin(file["id"], "batch_1")
    store.delete("k1", file["id"])


def test_expired_files_are_gone(tmp_path: Path) -> None:
    store, clock = make_store(tmp_path)
    up = store.begin("k1", "in.jsonl")
    up.write(LINE)
    file = up.commit("batch", expires_after_s=3600)
    assert file["expires_at"] == int(clock()) + 3600
    clock.advance(3600)
    assert store.list("k1") == ([], False)
    with pytest.raises(NotFoundError):
        store.get("k1", file["id"])
    assert os.listdir(tmp_path / "files") == []  # removed when found expired


def test_fsspec_urls_work_like_the_local_directory(tmp_path: Path) -> None:
    content = content_store("memory://batches-test/files")
    assert isinstance(content, FsspecContent)
    store = FileStore(FakeKV(), content)
    file = upload(store, "k1", LINE * 2)
    assert b"".join(store.content_chunks("k1", file["id"])) == LINE * 2
    assert list(store.lines(file["id"])) == [LINE, LINE]
    store.delete("k1", file["id"])
    assert not content.fs.exists(f"{content.root}/{file['id']}")
    assert isinstance(content_store(tmp_path), LocalContent)
    assert isinstance(content_store(f"file://{tmp_path}/x"), LocalContent)


def test_the_default_location_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APP_FILES_URL", str(tmp_path / "env"))
    content = content_store()
    assert isinstance(content, LocalContent) and content.root == tmp_path / "env"


def test_content_names_cannot_escape_the_root(tmp_path: Path) -> None:
    content = LocalContent(tmp_path)
    with pytest.raises(ValueError):
        content.open_read("../x")
