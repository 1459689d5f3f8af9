"""The Batch API core: OpenAI's batch object, its status machine (illegal transitions raise)
and the records in the KV store, each change a CAS update."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.api.errors import InvalidRequestError, NotFoundError
from app.batches.files import MAX_EXPIRY_S, MIN_EXPIRY_S, FileStore
from app.batches.index import TimeIndex
from app.batches.lines import ENDPOINTS
from app.batches.records import ConflictError, RecordKV, update

COMPLETION_WINDOWS = {"24h": 86_400}  # all OpenAI accepts
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


S = BatchStatus
TRANSITIONS: dict[BatchStatus, frozenset[BatchStatus]] = {
    S.VALIDATING: frozenset({S.IN_PROGRESS, S.FAILED, S.CANCELLING}),
    S.IN_PROGRESS: frozenset({S.FINALIZING, S.FAILED, S.CANCELLING}),
    # Expiry is found while running; the batch finalizes what did finish, then expires.
    S.FINALIZING: frozenset({S.COMPLETED, S.EXPIRED, S.FAILED}),
    S.CANCELLING: frozenset({S.CANCELLED, S.FAILED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.EXPIRED: frozenset(),
    S.CANCELLED: frozenset(),
}
TERMINAL = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)
CANCELLABLE = frozenset({S.VALIDATING, S.IN_PROGRESS})
PUBLIC = (
    "id",
    "object",
    "endpoint",
    "errors",
    "input_file_id",
    "completion_window",
    "status",
    "output_file_id",
    "error_file_id",
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
    "request_counts",
    "metadata",
)


class IllegalTransitionError(ValueError):
    pass


def transition(batch: dict[str, Any], to: BatchStatus, now: float) -> dict[str, Any]:
    """`batch` moved to status `to` with its `<status>_at` stamped; raises if not allowed."""
    current = BatchStatus(batch["status"])
    if to not in TRANSITIONS[current]:
        raise IllegalTransitionError(f"batch {batch['id']}: {current} -> {to} is not allowed")
    moved = dict(batch, status=str(to))
    moved[f"{to}_at"] = int(now)
    return moved


class BatchCreateRequest(BaseModel):
    """`POST /v1/batches`; unknown fields are tolerated, as elsewhere in the API."""

    model_config = ConfigDict(extra="allow")

    input_file_id: str = Field(min_length=1, max_length=256)
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    output_expires_after: dict[str, Any] | None = None

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if value not in ENDPOINTS:
            raise ValueError(f"must be one of {', '.join(ENDPOINTS)}")
        return value

    @field_validator("completion_window")
    @classmethod
    def _window(cls, value: str) -> str:
        if value not in COMPLETION_WINDOWS:
            raise ValueError(f"must be one of {', '.join(COMPLETION_WINDOWS)}")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > MAX_METADATA_PAIRS:
            raise ValueError(f"at most {MAX_METADATA_PAIRS} pairs")
        for key, item in value.items():
            if len(key) > MAX_METADATA_KEY or len(item) > MAX_METADATA_VALUE:
                raise ValueError(
                    f"keys are at most {MAX_METADATA_KEY} chars, values {MAX_METADATA_VALUE}"
                )
        return value

    @field_validator("output_expires_after")
    @classmethod
    def _output_expiry(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        seconds = value.get("seconds")
        if value.get("anchor") != "created_at" or not isinstance(seconds, int):
            raise ValueError("expected {'anchor': 'created_at', 'seconds': <int>}")
        if not MIN_EXPIRY_S <= seconds <= MAX_EXPIRY_S:
            raise ValueError(f"seconds must be in {MIN_EXPIRY_S}..{MAX_EXPIRY_S}")
        return value


def batch_key(batch_id: str) -> str:
    return f"batch:{batch_id}"


def public(record: dict[str, Any]) -> dict[str, Any]:
    return {name: record.get(name) for name in PUBLIC}


def not_found(batch_id: str) -> NotFoundError:
    return NotFoundError(f"No such Batch object: {batch_id}", param="batch_id")


def new_batch(
    req: BatchCreateRequest, owner: str, now: float, batch_id: str | None = None
) -> dict[str, Any]:
    window = COMPLETION_WINDOWS[req.completion_window]
    expiry = req.output_expires_after
    stamps = [f"{s}_at" for s in BatchStatus if s != S.VALIDATING]
    return {
        **dict.fromkeys(PUBLIC),
        **dict.fromkeys(stamps),
        "id": batch_id or f"batch_{uuid.uuid4().hex}",
        "object": "batch",
        "endpoint": req.endpoint,
        "input_file_id": req.input_file_id,
        "completion_window": req.completion_window,
        "status": str(S.VALIDATING),
        "created_at": int(now),
        "expires_at": int(now) + window,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": req.metadata,
        "owner": owner,
        "created": now,
        "output_expires_after_s": None if expiry is None else int(expiry["seconds"]),
    }


class BatchStore:
    """Batches per owner; another owner's batch is a 404."""

    def __init__(
        self, kv: RecordKV, files: FileStore, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.kv = kv
        self.files = files
        self.clock = clock
        self.index = TimeIndex(kv, "batch")

    def create(self, owner: str, req: BatchCreateRequest) -> dict[str, Any]:
        """A validating batch over a `batch` file of the owner's, which is pinned (not
        deletable) until the batch finishes. Starting its workflow is the caller's."""
        record = new_batch(req, owner, self.clock())
        file = self.files.record(req.input_file_id)
        if file is None or file.get("owner") != owner:
            raise InvalidRequestError(
                f"input_file_id: no such file {req.input_file_id!r}", param="input_file_id"
            )
        if file.get("purpose") != "batch":
            raise InvalidRequestError(
                "input_file_id must be a file uploaded with purpose 'batch'",
                param="input_file_id",
            )
        # The record first: a pin whose batch does not exist would block deletes forever,
        # and a batch whose pin was lost to a crash is pinned again by its validate step.
        self.kv.put(batch_key(record["id"]), record)
        try:
            self.files.pin(owner, req.input_file_id, record["id"])
        except NotFoundError:
            self.kv.delete(batch_key(record["id"]))
            raise InvalidRequestError(
                f"input_file_id: no such file {req.input_file_id!r}", param="input_file_id"
            ) from None
        self.index.add(owner, record["created"], record["id"])
        return public(record)

    def record(self, batch_id: str) -> dict[str, Any] | None:
        """The whole record, whoever owns it (for the workflow and the runner)."""
        record: dict[str, Any] | None = self.kv.get(batch_key(batch_id))
        return record

    def owned(self, owner: str, batch_id: str) -> dict[str, Any]:
        record = self.record(batch_id)
        if record is None or record.get("owner") != owner:
            raise not_found(batch_id)
        return record

    def get(self, owner: str, batch_id: str) -> dict[str, Any]:
        return public(self.owned(owner, batch_id))

    def list(
        self, owner: str, *, after: str | None = None, limit: int = 20
    ) -> tuple[list[dict[str, Any]], bool]:
        """A page of the owner's batches, newest first, and whether more follow."""
        position = None
        if after is not None:
            record = self.record(after)
            if record is None or record.get("owner") != owner:
                raise InvalidRequestError(f"after: no such batch {after!r}", param="after")
            position = (float(record["created"]), after)
        ids, more = self.index.page(owner, limit=limit, order="desc", after=position)
        records = self.kv.mget([batch_key(i) for i in ids])
        return [public(r) for r in records if r is not None], more

    def cancel(self, owner: str, batch_id: str) -> dict[str, Any]:
        """Ask a batch to stop (its workflow notices); repeating it is harmless. 409 once it
        is finalizing or finished, like OpenAI."""
        self.owned(owner, batch_id)
        now = self.clock()

        def cancel(record: dict[str, Any] | None) -> dict[str, Any]:
            if record is None:
                raise not_found(batch_id)
            status = BatchStatus(record["status"])
            if status == S.CANCELLING:
                return record
            if status not in CANCELLABLE:
                raise ConflictError(f"Cannot cancel a batch with status '{status}'.")
            return transition(record, S.CANCELLING, now)

        return public(update(self.kv, batch_key(batch_id), cancel))

    def advance(self, batch_id: str, to: BatchStatus, **fields: Any) -> dict[str, Any]:
        """Move the batch to `to` (a no-op if it is there already: steps are retried) and set
        `fields`; IllegalTransitionError if the machine forbids it."""
        now = self.clock()

        def move(record: dict[str, Any] | None) -> dict[str, Any]:
            if record is None:
                raise not_found(batch_id)
            if record["status"] != to:
                record = transition(record, to, now)
            record.update(fields)
            return record

        moved: dict[str, Any] = update(self.kv, batch_key(batch_id), move)
        return moved

    def set_fields(self, batch_id: str, **fields: Any) -> dict[str, Any]:
        """Set non-status fields (request_counts, file ids) of a batch not yet finished."""

        def change(record: dict[str, Any] | None) -> dict[str, Any]:
            if record is None:
                raise not_found(batch_id)
            if record["status"] in TERMINAL:
                raise IllegalTransitionError(f"batch {batch_id} is {record['status']}")
            record.update(fields)
            return record

        changed: dict[str, Any] = update(self.kv, batch_key(batch_id), change)
        return changed
