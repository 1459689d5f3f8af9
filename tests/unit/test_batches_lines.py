"""app.batches.lines: which input lines run and why the others go to the error file."""

from __future__ import annotations

import orjson

from app.batches.lines import BatchLine, LineError, check_lines

CHAT = "/v1/chat/completions"


def line(custom_id: object = "a", **over: object) -> bytes:
    data = {"custom_id": custom_id, "method": "POST", "url": CHAT}
    data["body"] = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    data.update(over)
    return orjson.dumps(data) + b"\n"


def outcomes(*raw: bytes) -> list[BatchLine | LineError]:
    return list(check_lines(raw, CHAT, {"echo"}))


def test_a_good_line_runs() -> None:
    [ok] = outcomes(line("r1"))
    assert ok == BatchLine(1, "r1", CHAT, {"model": "echo", "messages": ok.body["messages"]})


def test_blank_lines_are_skipped_but_counted_in_line_numbers() -> None:
    got = outcomes(line("r1"), b"\n", b"  \n", line("r2"))
    assert [(o.line, o.custom_id) for o in got] == [(1, "r1"), (4, "r2")]


def test_each_bad_line_names_its_custom_id_line_and_reason() -> None:
    got = outcomes(
        b"{not json\n",
        b"[1, 2]\n",
        line(None),
        line("dup"),
        line("dup"),
        line("m", method="GET"),
        line("u", url="/v1/images/generations"),
        line("w", url="/v1/embeddings"),
        line("b", body="text"),
        line("nm", body={"messages": []}),
        line("x", body={"model": "gpt-9"}),
        line("s", body={"model": "echo", "stream": True}),
        line("long" * 200),
    )
    errors = [(o.line, o.custom_id, o.code, o.param) for o in got if isinstance(o, LineError)]
    assert errors == [
        (1, None, "invalid_json_line", None),
        (2, None, "invalid_json_line", None),
        (3, None, "missing_required_parameter", "custom_id"),
        (5, "dup", "duplicate_custom_id", "custom_id"),
        (6, "m", "invalid_method", "method"),
        (7, "u", "invalid_url", "url"),
        (8, "w", "mismatched_url", "url"),
        (9, "b", "invalid_body", "body"),
        (10, "nm", "missing_required_parameter", "body.model"),
        (11, "x", "model_not_found", "body.model"),
        (12, "s", "invalid_body", "body.stream"),
        (13, "long" * 200, "invalid_custom_id", "custom_id"),
    ]
    assert [o.custom_id for o in got if isinstance(o, BatchLine)] == ["dup"]  # the first one
    first = got[0]
    assert isinstance(first, LineError)
    assert first.error()["line"] == 1 and first.error()["message"]


def test_validation_is_deterministic() -> None:
    raw = [line("a"), line("a"), line("b", body={"model": "nope"})]
    assert outcomes(*raw) == outcomes(*raw)
