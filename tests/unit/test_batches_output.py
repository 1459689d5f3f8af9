"""app.batches.output: result records in OpenAI's output format, assembled in input order
with one line per custom_id, into an output file (2xx) and an error file (the rest)."""

from __future__ import annotations

from pathlib import Path

import orjson

from app.batches.content import LocalContent
from app.batches.files import FileStore
from app.batches.lines import check_lines
from app.batches.output import (
    ResultStore,
    assemble,
    error_record,
    output_file_id,
    response_record,
    write_files,
)
from tests.unit.kv_fakes import FakeKV

CHAT = "/v1/chat/completions"


def raw(custom_id: str, model: str = "echo") -> bytes:
    line = {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": {"model": model}}
    return orjson.dumps(line) + b"\n"


def test_records_have_openais_output_shape() -> None:
    ok = response_record("b1", "r1", 200, {"id": "chatcmpl-1"}, request_id="req-1")
    assert ok == {
        "id": ok["id"],
        "custom_id": "r1",
        "response": {"status_code": 200, "request_id": "req-1", "body": {"id": "chatcmpl-1"}},
        "error": None,
    }
    assert ok["id"].startswith("batch_req_")
    assert ok["id"] == response_record("b1", "r1", 500, {})["id"]  # derived from the line
    bad = error_record("b1", "r2", {"code": "batch_expired", "message": "late"})
    assert bad["response"] is None and bad["error"]["code"] == "batch_expired"


def test_assembly_keeps_input_order_and_one_line_per_custom_id(tmp_path: Path) -> None:
    kv = FakeKV()
    results = ResultStore(kv)
    assert results.store("b1", response_record("b1", "a", 200, {"n": 1}))
    assert not results.store("b1", response_record("b1", "a", 200, {"n": 2}))  # ran twice
    results.store("b1", response_record("b1", "c", 400, {"error": {"message": "no"}}))
    lines = [raw("a"), b"oops\n", raw("b"), raw("c"), raw("d", model="nope")]
    records = list(assemble(check_lines(lines, CHAT, {"echo"}), results, "b1", "expired"))
    assert [(r["custom_id"], r["error"] and r["error"]["code"]) for r in records] == [
        ("a", None),
        (None, "invalid_json_line"),
        ("b", "batch_expired"),  # no result when the window closed
        ("c", None),
        ("d", "model_not_found"),
    ]
    assert records[0]["response"]["body"] == {"n": 1}  # the first result, not the rerun
    assert records[1]["error"]["line"] == 2

    files = FileStore(kv, LocalContent(tmp_path))
    written = write_files(files, "k1", "b1", records, expires_after_s=3600)
    assert (written.completed, written.failed) == (1, 4)
    assert written.output_file_id == output_file_id("b1", "output")
    out = [
        orjson.loads(x)
        for x in b"".join(files.content_chunks("k1", written.output_file_id)).splitlines()
    ]
    assert out == [records[0]]
    assert written.error_file_id is not None
    err = b"".join(files.content_chunks("k1", written.error_file_id)).splitlines()
    assert [orjson.loads(x)["custom_id"] for x in err] == [None, "b", "c", "d"]
    meta = files.get("k1", written.output_file_id)
    assert meta["purpose"] == "batch_output" and meta["expires_at"] is not None

    again = write_files(files, "k1", "b1", records)  # a retried step replaces its files
    assert again == written.__class__(written.output_file_id, written.error_file_id, 1, 4)
    assert len(files.list("k1")[0]) == 2


def test_no_error_file_when_every_line_succeeded(tmp_path: Path) -> None:
    kv = FakeKV()
    results = ResultStore(kv)
    results.store("b1", response_record("b1", "a", 200, {}))
    records = assemble(check_lines([raw("a")], CHAT, {"echo"}), results, "b1", "completed")
    written = write_files(FileStore(kv, LocalContent(tmp_path)), "k1", "b1", records)
    assert written.output_file_id is not None and written.error_file_id is None
