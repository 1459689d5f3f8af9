"""Request ids and log lines: a sane client id is kept, anything else replaced; every record made
while a request is served carries its id (and trace ids when a span is current), as text or
JSON; inside Serve our id and Serve's agree."""

from __future__ import annotations

import contextvars
import io
import logging
import re
import sys
from collections.abc import Callable, Iterator
from typing import TypeVar

import orjson
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

from app.observability import logs
from app.observability.logs import (
    JSONFormatter,
    RequestContextFilter,
    ServeRelayHandler,
    bind_request_id,
    configure_logging,
    current_request_id,
    new_request_id,
    serve_logging_config,
    text_formatter,
)
from app.observability.tracing import TracingConfig, setup_tracing, shutdown_tracing, span

T = TypeVar("T")
GENERATED = re.compile(r"req_[0-9a-f]{24}")


@pytest.fixture
def tracing_on(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(trace, "_TRACER_PROVIDER_SET_ONCE", Once())
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    setup_tracing(TracingConfig(sample_ratio=1.0), "test", exporter=InMemorySpanExporter())
    yield
    shutdown_tracing()


@pytest.fixture
def isolated_logger(request: pytest.FixtureRequest) -> Iterator[str]:
    """A logger of this test's own, with configure_logging's changes undone afterwards."""
    name = f"test_logs.{request.node.name}"
    yield name
    handler = logs._installed.pop(name, None)
    if handler is not None:
        logging.getLogger(name).removeHandler(handler)


def in_fresh_context(fn: Callable[[], T]) -> T:
    """Run `fn` as a new request task would: in its own context."""
    return contextvars.Context().run(fn)


@pytest.mark.parametrize(
    "incoming",
    ["req_0123abcd", "6f1c2b9e-8f3a-4c1d-9a7e-2b5d0c3e4f5a", "Root=1-abc:x.y_z+/=@", "a" * 128],
)
def test_a_sane_client_id_is_kept(incoming: str) -> None:
    assert new_request_id(incoming) == incoming


@pytest.mark.parametrize(
    "incoming",
    [
        None,
        "",
        "a" * 129,
        "has space",
        'quote"d',
        "new\nline",
        "tab\t",
        "ünïcode",
        "semi;colon",
        "{json}",
    ],
)
def test_a_missing_or_malformed_id_is_replaced_by_a_generated_one(incoming: str | None) -> None:
    generated = new_request_id(incoming)
    assert GENERATED.fullmatch(generated)
    assert new_request_id(incoming) != generated


def test_bind_makes_the_id_current_for_this_request_only() -> None:
    def request(incoming: str | None) -> tuple[str, str | None]:
        return bind_request_id(incoming), current_request_id()

    assert in_fresh_context(lambda: request("req_client")) == ("req_client", "req_client")
    bound, current = in_fresh_context(lambda: request("bad id"))
    assert GENERATED.fullmatch(bound) and current == bound
    assert current_request_id() is None


def test_a_replaced_client_id_is_logged_with_the_one_used(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="app.observability.logs"):
        bound = in_fresh_context(lambda: bind_request_id("x" * 500))
    (record,) = caplog.records
    assert bound in record.getMessage() and len(record.getMessage()) < 200
    assert getattr(record, "request_id", bound) == bound


def test_bind_adopts_serves_id_and_makes_serve_agree_with_ours() -> None:
    from ray.serve import context as serve_context

    def request(serve_id: str, incoming: str | None) -> tuple[str, str]:
        serve_context._serve_request_context.set(
            serve_context._RequestContext(route="/v1/chat", request_id=serve_id, app_name="gw")  # type: ignore[arg-type]
        )
        ours = bind_request_id(incoming)
        theirs = serve_context._get_serve_request_context()
        assert theirs.route == "/v1/chat" and theirs.app_name == "gw"  # the rest kept
        return ours, theirs.request_id

    # No header reached us (a handle call): Serve's id, passed along by Serve, is ours too.
    assert in_fresh_context(lambda: request("6f1c2b9e-uuid", None)) == ("6f1c2b9e-uuid",) * 2
    # A malformed client header Serve took as it was: ours replaces it in Serve's context.
    ours, theirs = in_fresh_context(lambda: request("bad id", "bad id"))
    assert GENERATED.fullmatch(ours) and theirs == ours


def test_the_filter_puts_the_request_id_on_records_and_nothing_outside_requests() -> None:
    record = logging.LogRecord("app.x", logging.INFO, __file__, 1, "hello", None, None)
    assert RequestContextFilter().filter(record)
    assert not hasattr(record, "request_id") and not hasattr(record, "trace_id")

    def inside() -> logging.LogRecord:
        bind_request_id("req_abc")
        record = logging.LogRecord("app.x", logging.INFO, __file__, 1, "hello", None, None)
        RequestContextFilter().filter(record)
        return record

    assert getattr(in_fresh_context(inside), "request_id", None) == "req_abc"


def test_the_filter_adds_trace_and_span_ids_while_a_span_is_current(tracing_on: None) -> None:
    record = logging.LogRecord("app.x", logging.INFO, __file__, 1, "hello", None, None)
    with span("http") as current:
        RequestContextFilter().filter(record)
    context = current.get_span_context()
    assert record.trace_id == format(context.trace_id, "032x")  # type: ignore[attr-defined]
    assert record.span_id == format(context.span_id, "016x")  # type: ignore[attr-defined]


def test_json_lines_parse_and_carry_the_request_id_extras_and_the_exception() -> None:
    def inside() -> str:
        bind_request_id("req_json")
        try:
            raise ValueError("bad")
        except ValueError:
            record = logging.LogRecord(
                "app.api", logging.ERROR, __file__, 7, "failed %s", ("chat",), sys.exc_info()
            )
        record.model = "tiny"  # as logger.error(..., extra={"model": "tiny"}) would set it
        RequestContextFilter().filter(record)
        return JSONFormatter().format(record)

    line = orjson.loads(in_fresh_context(inside))
    assert line["request_id"] == "req_json" and line["message"] == "failed chat"
    assert line["level"] == "ERROR" and line["logger"] == "app.api" and line["model"] == "tiny"
    assert "ValueError: bad" in line["exc_info"] and line["ts"].endswith("+00:00")


def test_text_lines_show_the_request_id_or_a_dash() -> None:
    record = logging.LogRecord("app.x", logging.INFO, __file__, 1, "hello", None, None)
    assert "app.x [-] hello" in text_formatter().format(record)
    record.request_id = "req_t"
    assert "app.x [req_t] hello" in text_formatter().format(record)


def test_configure_logging_is_idempotent_and_writes_json_when_asked(
    isolated_logger: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APP_LOG_FORMAT", "json")
    stream = io.StringIO()
    configure_logging(logger_name=isolated_logger, stream=stream)
    configure_logging(logger_name=isolated_logger, stream=stream, level="DEBUG")
    logger = logging.getLogger(f"{isolated_logger}.module")
    assert len(logging.getLogger(isolated_logger).handlers) == 1

    def request() -> None:
        bind_request_id("req_cfg")
        logger.debug("handled")

    in_fresh_context(request)
    (line,) = stream.getvalue().splitlines()
    assert orjson.loads(line)["request_id"] == "req_cfg"


def test_an_unknown_format_or_level_fails_naming_the_variable(
    isolated_logger: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APP_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="APP_LOG_FORMAT"):
        configure_logging(logger_name=isolated_logger, stream=io.StringIO())
    monkeypatch.setenv("APP_LOG_FORMAT", "text")
    monkeypatch.setenv("APP_LOG_LEVEL", "LOUD")
    with pytest.raises(ValueError, match="APP_LOG_LEVEL"):
        configure_logging(logger_name=isolated_logger, stream=io.StringIO())


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_the_relay_hands_records_with_our_id_to_serves_logger() -> None:
    from ray.serve._private.logging_utils import ServeContextFilter

    serve_logger = logging.getLogger(logs.SERVE_LOGGER)
    capture = ListHandler()
    capture.addFilter(ServeContextFilter())  # what Serve's replica handler adds
    serve_logger.addHandler(capture)
    relay = ServeRelayHandler()
    relay.addFilter(RequestContextFilter())

    def request() -> None:
        bind_request_id("req_relay")
        relay.handle(logging.LogRecord("app.x", logging.WARNING, __file__, 1, "hi", None, None))

    try:
        in_fresh_context(request)
    finally:
        serve_logger.removeHandler(capture)
    (record,) = capture.records
    assert record.request_id == "req_relay"  # type: ignore[attr-defined]


def test_serve_logging_config_is_a_valid_serve_logging_config() -> None:
    from ray.serve.schema import LoggingConfig

    config = LoggingConfig(**serve_logging_config("json", "debug"))
    assert config.encoding == "JSON" and config.log_level == "DEBUG"
    assert LoggingConfig(**serve_logging_config("text")).encoding == "TEXT"
