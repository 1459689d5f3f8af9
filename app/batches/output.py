"""Per-line results and the output and error files: a line's result is stored once under its
idempotency key (first writer wins, so a line run twice appears once), and the files are
assembled from the input's order in OpenAI's format {id, custom_id, response, error}."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from app.batches.files import CHUNK_BYTES, FileStore, Upload
from app.batches.lines import BatchLine, LineError
from app.batches.records import RecordKV, put_if_absent, update

RESULT_TTL_S = 7 * 86_400.0  # outlives the 24 h window and the output step's retries
FETCH_CHUNK = 500
# What a line that has no result when the batch ends is reported as, by how the run ended.
MISSING = {
    "expired": (
        "batch_expired",
        "This request could not be executed before the completion window expired.",
    ),
    "cancelled": ("batch_cancelled", "This request was not executed: the batch was cancelled."),
    "completed": ("server_error", "This request failed on every attempt."),
}


def idempotency_key(batch_id: str, custom_id: str) -> str:
    return f"{batch_id}:{custom_id}"


def result_key(batch_id: str, custom_id: str) -> str:
    return f"batchres:{idempotency_key(batch_id, custom_id)}"


def line_id(batch_id: str, tag: str) -> str:
    """The record's `id`: derived, so a rewritten output file is byte-identical."""
    return "batch_req_" + hashlib.sha256(f"{batch_id}:{tag}".encode()).hexdigest()[:32]


def output_file_id(batch_id: str, kind: str) -> str:
    """The id of a batch's `output` or `error` file: fixed, so a retried step replaces it."""
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:32]


def response_record(
    batch_id: str, custom_id: str, status: int, body: Any, request_id: str | None = None
) -> dict[str, Any]:
    return {
        "id": line_id(batch_id, custom_id),
        "custom_id": custom_id,
        "response": {
            "status_code": status,
            "request_id": request_id or uuid.uuid4().hex,
            "body": body,
        },
        "error": None,
    }


def error_record(
    batch_id: str, custom_id: str | None, error: dict[str, Any], tag: str | None = None
) -> dict[str, Any]:
    return {
        "id": line_id(batch_id, tag or custom_id or ""),
        "custom_id": custom_id,
        "response": None,
        "error": error,
    }


def succeeded(record: dict[str, Any]) -> bool:
    """Whether a record belongs in the output file (a 2xx answer) or the error file."""
    response = record.get("response")
    return isinstance(response, dict) and 200 <= int(response.get("status_code", 0)) < 300


class ResultStore:
    """Line results in the KV store, one per idempotency key."""

    def __init__(self, kv: RecordKV, *, ttl_s: float = RESULT_TTL_S) -> None:
        self.kv = kv
        self.ttl_s = ttl_s

    def store(self, batch_id: str, record: dict[str, Any]) -> bool:
        """True if this is the line's first result (and so the one that counts)."""
        key = result_key(batch_id, record["custom_id"])
        return put_if_absent(self.kv, key, record, ttl=self.ttl_s)

    def fetch(self, batch_id: str, custom_ids: list[str]) -> list[dict[str, Any] | None]:
        return self.kv.mget([result_key(batch_id, c) for c in custom_ids])


def assemble(
    outcomes: Iterable[BatchLine | LineError], results: ResultStore, batch_id: str, ended: str
) -> Iterator[dict[str, Any]]:
    """Every line's record in input order: its stored result, its validation error, or what
    `ended` ("completed", "expired", "cancelled") makes of a line with no result."""
    code, message = MISSING[ended]
    chunk: list[BatchLine | LineError] = []

    def flush() -> Iterator[dict[str, Any]]:
        runnable = [o.custom_id for o in chunk if isinstance(o, BatchLine)]
        found = iter(results.fetch(batch_id, runnable))
        for outcome in chunk:
            if isinstance(outcome, LineError):
                yield error_record(batch_id, outcome.custom_id, outcome.error(), f"#{outcome.line}")
                continue
            result = next(found)
            if result is None:
                result = error_record(
                    batch_id, outcome.custom_id, {"code": code, "message": message}
                )
            yield result
        chunk.clear()

    for outcome in outcomes:
        chunk.append(outcome)
        if len(chunk) == FETCH_CHUNK:
            yield from flush()
    yield from flush()


@dataclass(frozen=True)
class Written:
    output_file_id: str | None
    error_file_id: str | None
    completed: int
    failed: int


class _JSONLWriter:
    def __init__(self, upload: Upload) -> None:
        self.upload = upload
        self.buffer = bytearray()
        self.lines = 0

    def add(self, record: dict[str, Any]) -> None:
        self.buffer += orjson.dumps(record) + b"\n"
        self.lines += 1
        if len(self.buffer) >= CHUNK_BYTES:
            self.upload.write(bytes(self.buffer))
            self.buffer.clear()

    def finish(self, expires_after_s: int | None) -> str | None:
        """The file's id, or None (and nothing kept) if no line was written."""
        if not self.lines:
            self.upload.abort()
            return None
        self.upload.write(bytes(self.buffer))
        return str(self.upload.commit("batch_output", expires_after_s=expires_after_s)["id"])


def write_files(
    files: FileStore,
    owner: str,
    batch_id: str,
    records: Iterable[dict[str, Any]],
    *,
    expires_after_s: int | None = None,
) -> Written:
    """The output and error files (each only if it has a line), replacing any an earlier
    attempt of the same batch left."""
    writers = {}
    for kind in ("output", "error"):
        file_id = output_file_id(batch_id, kind)
        files.remove(file_id)
        upload = files.begin(owner, f"{batch_id}_{kind}.jsonl", file_id=file_id)
        writers[kind] = _JSONLWriter(upload)
    try:
        for record in records:
            writers["output" if succeeded(record) else "error"].add(record)
        out, err = writers["output"], writers["error"]
        return Written(
            out.finish(expires_after_s), err.finish(expires_after_s), out.lines, err.lines
        )
    except BaseException:
        for writer in writers.values():
            writer.upload.abort()
            files.remove(writer.upload.id)
        raise


def counts_key(batch_id: str) -> str:
    return f"batch:counts:{batch_id}"


class Tally:
    """Lines that got their first result, per batch, added to a KV counter now and then:
    request_counts while a batch runs. Lines whose worker died before a flush are missing
    from it; the output step counts every line exactly."""

    def __init__(self, kv: RecordKV) -> None:
        self.kv = kv
        self.pending: dict[str, list[int]] = {}

    def add(self, batch_id: str, ok: bool) -> None:
        counts = self.pending.setdefault(batch_id, [0, 0])
        counts[0 if ok else 1] += 1

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        for batch_id, (completed, failed) in pending.items():

            def add(
                current: dict[str, int] | None, c: int = completed, f: int = failed
            ) -> dict[str, int]:
                current = current or {"completed": 0, "failed": 0}
                return {"completed": current["completed"] + c, "failed": current["failed"] + f}

            update(self.kv, counts_key(batch_id), add, ttl=RESULT_TTL_S)


def read_counts(kv: RecordKV, batch_id: str) -> tuple[int, int]:
    """(completed, failed) lines of a running batch so far."""
    counts = kv.get(counts_key(batch_id)) or {}
    return int(counts.get("completed", 0)), int(counts.get("failed", 0))
