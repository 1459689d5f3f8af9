"""A batch input file's lines: each is a request to run (BatchLine) or a reason it cannot run
(LineError); a bad line never fails the batch, it goes to the error file."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MAX_CUSTOM_ID_CHARS = 512  # it becomes part of a KV key (1 KiB at most)


@dataclass(frozen=True)
class BatchLine:
    line: int  # 1-based, counting every line of the file
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass(frozen=True)
class LineError:
    line: int
    custom_id: str | None
    code: str
    message: str
    param: str | None = None

    def error(self) -> dict[str, Any]:
        """The `error` of its error-file record."""
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


class LineValidator:
    """Checks lines in file order; remembers custom_ids, so the first of two equal ones runs
    and the second is an error. Deterministic for a given file, endpoint and model set."""

    def __init__(self, endpoint: str, models: Iterable[str]) -> None:
        self.endpoint = endpoint
        self.models = frozenset(models)
        self.seen: set[str] = set()

    def check(self, number: int, raw: bytes) -> BatchLine | LineError | None:
        """The line's outcome; None for a blank line (not a request)."""
        if not raw.strip():
            return None
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return LineError(number, None, "invalid_json_line", f"line is not valid JSON: {exc}")
        if not isinstance(data, dict):
            return LineError(number, None, "invalid_json_line", "line is not a JSON object")
        custom_id = data.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            return LineError(
                number, None, "missing_required_parameter", "custom_id is required", "custom_id"
            )
        problem = self._problem(data, custom_id)
        if problem is not None:
            code, message, param = problem
            return LineError(number, custom_id, code, message, param)
        self.seen.add(custom_id)
        return BatchLine(number, custom_id, data["url"], data["body"])

    def _problem(self, data: dict[str, Any], custom_id: str) -> tuple[str, str, str] | None:
        if len(custom_id) > MAX_CUSTOM_ID_CHARS:
            too_long = f"custom_id is over {MAX_CUSTOM_ID_CHARS} chars"
            return "invalid_custom_id", too_long, "custom_id"
        if custom_id in self.seen:
            return "duplicate_custom_id", f"custom_id {custom_id!r} is used twice", "custom_id"
        if data.get("method") != "POST":
            return "invalid_method", "method must be 'POST'", "method"
        url = data.get("url")
        if url not in ENDPOINTS:
            return "invalid_url", f"url must be one of {', '.join(ENDPOINTS)}", "url"
        if url != self.endpoint:
            return (
                "mismatched_url",
                f"url {url!r} does not match the batch's endpoint {self.endpoint!r}",
                "url",
            )
        return self._body_problem(data.get("body"))

    def _body_problem(self, body: Any) -> tuple[str, str, str] | None:
        if not isinstance(body, dict):
            return "invalid_body", "body must be a JSON object", "body"
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return "missing_required_parameter", "body.model is required", "body.model"
        if model not in self.models:
            return "model_not_found", f"the model {model!r} does not exist", "body.model"
        if body.get("stream"):
            return "invalid_body", "batch requests cannot stream", "body.stream"
        return None


def check_lines(
    raw_lines: Iterable[bytes], endpoint: str, models: Iterable[str]
) -> Iterator[BatchLine | LineError]:
    """Every request line's outcome, in file order."""
    validator = LineValidator(endpoint, models)
    for number, raw in enumerate(raw_lines, start=1):
        outcome = validator.check(number, raw)
        if outcome is not None:
            yield outcome
