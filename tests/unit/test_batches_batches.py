"""app.batches.batches: the status machine (every transition, legal or not), the create
request's validation and the store: ownership, paging, cancel and pins."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.api.errors import InvalidRequestError, NotFoundError
from app.api.http import validate_request
from app.batches.batches import (
    TERMINAL,
    TRANSITIONS,
    BatchCreateRequest,
    BatchStatus,
    BatchStore,
    IllegalTransitionError,
    new_batch,
    public,
    transition,
)
from app.batches.content import LocalContent
from app.batches.files import FileStore
from app.batches.records import ConflictError
from tests.unit.kv_fakes import FakeClock, FakeKV

S = BatchStatus
LEGAL = {
    (S.VALIDATING, S.IN_PROGRESS),
    (S.VALIDATING, S.FAILED),
    (S.VALIDATING, S.CANCELLING),
    (S.IN_PROGRESS, S.FINALIZING),
    (S.IN_PROGRESS, S.FAILED),
    (S.IN_PROGRESS, S.CANCELLING),
    (S.FINALIZING, S.COMPLETED),
    (S.FINALIZING, S.EXPIRED),
    (S.FINALIZING, S.FAILED),
    (S.CANCELLING, S.CANCELLED),
    (S.CANCELLING, S.FAILED),
}
REQ = {"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h"}


def batch(status: BatchStatus) -> dict[str, Any]:
    record = new_batch(BatchCreateRequest.model_validate(REQ), "k1", 1000.0)
    record["status"] = str(status)
    return record


@pytest.mark.parametrize("src", list(S))
@pytest.mark.parametrize("dst", list(S))
def test_every_transition_is_legal_or_raises(src: BatchStatus, dst: BatchStatus) -> None:
    if (src, dst) in LEGAL:
        moved = transition(batch(src), dst, 2000.5)
        assert moved["status"] == dst and moved[f"{dst}_at"] == 2000
    else:
        with pytest.raises(IllegalTransitionError):
            transition(batch(src), dst, 2000.0)


def test_terminal_statuses_have_no_way_out() -> None:
    assert {S.COMPLETED, S.FAILED, S.EXPIRED, S.CANCELLED} == TERMINAL
    assert {(a, b) for a, nxt in TRANSITIONS.items() for b in nxt} == LEGAL


def test_batch_object_has_openais_shape() -> None:
    record = batch(S.VALIDATING)
    body = public(record)
    assert list(body) == [
        "id", "object", "endpoint", "errors", "input_file_id", "completion_window", "status",
        "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at",
        "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
        "cancelled_at", "request_counts", "metadata",
    ]  # fmt: skip
    assert body["id"].startswith("batch_") and body["object"] == "batch"
    assert body["expires_at"] == 1000 + 86_400
    assert body["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert "owner" not in body


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"completion_window": "1h"}, "completion_window"),
        ({"endpoint": "/v1/moderations"}, "endpoint"),
        ({"input_file_id": None}, "input_file_id"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata"),
        ({"output_expires_after": {"anchor": "created_at", "seconds": 60}}, "output_expires_after"),
    ],
)
def test_bad_create_requests_are_400_naming_the_param(change: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        validate_request(REQ | change, BatchCreateRequest)
    assert err.value.param == param


@pytest.fixture
def stores(tmp_path: Path) -> tuple[BatchStore, FileStore, FakeClock]:
    clock = FakeClock()
    kv = FakeKV(clock)
    files = FileStore(kv, LocalContent(tmp_path), clock=clock)
    return BatchStore(kv, files, clock=clock), files, clock


def input_file(files: FileStore, owner: str = "k1") -> str:
    up = files.begin(owner, "in.jsonl")
    up.write(b"{}\n")
    return str(up.commit("batch")["id"])


def create(store: BatchStore, file_id: str, owner: str = "k1") -> dict[str, Any]:
    return store.create(owner, BatchCreateRequest.model_validate(REQ | {"input_file_id": file_id}))


def test_create_pins_the_input_and_checks_it(stores: Any) -> None:
    store, files, _ = stores
    file_id = input_file(files)
    created = create(store, file_id)
    assert created["status"] == "validating"
    assert files.record(file_id)["pins"] == [created["id"]]
    with pytest.raises(InvalidRequestError):
        create(store, file_id, owner="k2")  # another owner's file does not exist for k2
    out = files.create("k1", "o.jsonl", "batch_output", [b"{}\n"], file_id="file-out")
    with pytest.raises(InvalidRequestError):
        create(store, out["id"])  # not a batch input


def test_batches_are_per_owner_and_paged_newest_first(stores: Any) -> None:
    store, files, clock = stores
    file_id = input_file(files)
    ids = []
    for _ in range(5):
        clock.advance(1)
        ids.append(create(store, file_id)["id"])
    page, more = store.list("k1", limit=2)
    assert [b["id"] for b in page] == ids[:-3:-1] and more
    page, more = store.list("k1", after=page[-1]["id"], limit=10)
    assert [b["id"] for b in page] == ids[2::-1] and not more
    assert store.list("k2") == ([], False)
    with pytest.raises(NotFoundError):
        store.get("k2", ids[0])


def test_cancel_is_idempotent_and_refused_once_finalizing(stores: Any) -> None:
    store, files, _ = stores
    created = create(store, input_file(files))
    assert store.cancel("k1", created["id"])["status"] == "cancelling"
    assert store.cancel("k1", created["id"])["status"] == "cancelling"
    other = create(store, input_file(files))
    store.advance(other["id"], S.IN_PROGRESS)
    store.advance(other["id"], S.FINALIZING)
    with pytest.raises(ConflictError) as err:
        store.cancel("k1", other["id"])
    assert err.value.status == 409
    with pytest.raises(NotFoundError):
        store.cancel("k2", created["id"])


def test_advance_is_idempotent_and_enforces_the_machine(stores: Any) -> None:
    store, files, _ = stores
    created = create(store, input_file(files))
    store.advance(created["id"], S.IN_PROGRESS)
    again = store.advance(created["id"], S.IN_PROGRESS, request_counts={"total": 1})
    assert again["request_counts"] == {"total": 1}
    with pytest.raises(IllegalTransitionError):
        store.advance(created["id"], S.COMPLETED)
