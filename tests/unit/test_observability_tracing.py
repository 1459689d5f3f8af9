"""Tracing: spans nest under one trace id, a client's traceparent is honoured, a carried dict
takes a trace across a process boundary, sampling decides what is recorded, and with nothing
configured every helper is a no-op."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Iterator

import orjson
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import INVALID_SPAN, StatusCode
from opentelemetry.util._once import Once

from app.observability import tracing
from app.observability.tracing import (
    TracingConfig,
    TracingConfigError,
    current_ids,
    current_traceparent,
    extract,
    inject,
    setup_tracing,
    shutdown_tracing,
    span,
    traced_stream,
)

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
OTEL_VARIABLES = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_SERVICE_NAME",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
)


def traceparent(
    trace_id: str = CLIENT_TRACE, span_id: str = CLIENT_SPAN, sampled: bool = True
) -> str:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


@pytest.fixture(autouse=True)
def _clean_tracing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No OTEL_* variable from the environment, and OpenTelemetry's global provider restored
    after each test (it may be set only once per process)."""
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER_SET_ONCE", Once())
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    yield
    shutdown_tracing()


def traced(ratio: float = 1.0, **config: object) -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    assert setup_tracing(TracingConfig(sample_ratio=ratio, **config), "test", exporter=exporter)
    return exporter


def by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {s.name: s for s in exporter.get_finished_spans()}


def test_nested_spans_share_a_trace_id_and_link_parent_to_child() -> None:
    exporter = traced()
    with span("outer", model="m") as outer, span("inner", replica=None):
        pass
    spans = by_name(exporter)
    assert spans["outer"].context.trace_id == spans["inner"].context.trace_id
    assert spans["inner"].parent is not None
    assert spans["inner"].parent.span_id == outer.get_span_context().span_id
    assert spans["outer"].attributes == {"model": "m"}
    assert "replica" not in (spans["inner"].attributes or {})  # None values are left out
    assert spans["outer"].resource.attributes["service.name"] == "test"


def test_a_clients_traceparent_is_honoured() -> None:
    exporter = traced()
    parent = extract({"traceparent": traceparent()})
    with span("http", parent=parent, kind=tracing.SpanKind.SERVER):
        assert current_traceparent() is not None
    (http,) = exporter.get_finished_spans()
    assert format(http.context.trace_id, "032x") == CLIENT_TRACE
    assert http.parent is not None and format(http.parent.span_id, "016x") == CLIENT_SPAN
    assert http.parent.is_remote and http.kind is tracing.SpanKind.SERVER


def test_starlette_headers_are_read_case_insensitively() -> None:
    from starlette.datastructures import Headers

    traced()
    headers = Headers(raw=[(b"traceparent", traceparent().encode())])
    assert extract(headers) is not None
    assert extract(Headers(raw=[(b"traceparent", b"00-garbage")])) is None
    assert extract({}) is None and extract(None) is None


def test_inject_then_extract_carries_the_trace_across_a_process_boundary() -> None:
    exporter = traced()
    with span("gateway.call") as caller:
        carried = inject({"x-request-id": "req_1"})
    # What a Serve handle call pickles: a plain dict of strings, nothing else.
    wire = orjson.loads(orjson.dumps(carried))
    assert wire["x-request-id"] == "req_1" and wire["traceparent"].startswith("00-")

    def replica() -> None:  # a fresh context, as in another process
        assert trace.get_current_span() is INVALID_SPAN
        with span("replica.chat", parent=extract(wire)):
            pass

    contextvars.Context().run(replica)
    spans = by_name(exporter)
    assert spans["replica.chat"].context.trace_id == caller.get_span_context().trace_id
    assert spans["replica.chat"].parent is not None
    assert spans["replica.chat"].parent.span_id == caller.get_span_context().span_id


def test_ratio_zero_records_nothing_but_still_propagates() -> None:
    exporter = traced(ratio=0.0)
    with span("outer") as outer, span("inner") as inner:
        assert not outer.is_recording() and outer.get_span_context().is_valid
        assert inner is INVALID_SPAN  # nothing under an unsampled span is made at all
        propagated = current_traceparent()
        assert propagated is not None and int(propagated[-2:], 16) & 1 == 0  # not sampled
        assert current_ids() is not None  # log lines still get the trace id
    assert exporter.get_finished_spans() == ()


def test_a_sampled_client_is_followed_unless_configured_not_to() -> None:
    exporter = traced(ratio=0.0)
    with span("http", parent=extract({"traceparent": traceparent()})):
        pass
    assert len(exporter.get_finished_spans()) == 1
    shutdown_tracing()
    exporter = traced(ratio=0.0, honour_client_sampling=False)
    with span("http", parent=extract({"traceparent": traceparent()})):
        pass
    assert exporter.get_finished_spans() == ()


def test_not_configured_installs_nothing_and_every_helper_is_a_no_op() -> None:
    assert setup_tracing(None, "gateway") is False
    assert setup_tracing(TracingConfig(), "gateway") is False
    assert not tracing.tracing_enabled()
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    with span("anything", model="m") as s:
        s.set_attribute("ignored", 1)  # the invalid span takes attributes silently
        assert s is INVALID_SPAN
    carrier = {"x-request-id": "req_1"}
    assert inject(carrier) == {"x-request-id": "req_1"}
    assert extract({"traceparent": traceparent()}) is None
    assert current_traceparent() is None and current_ids() is None


async def test_not_configured_a_stream_is_returned_as_it_is() -> None:
    async def items() -> AsyncIterator[int]:
        yield 1

    stream = items()
    assert traced_stream("s", stream) is stream


def test_setup_is_idempotent_and_installs_the_global_provider_once() -> None:
    traced()
    provider = trace.get_tracer_provider()
    assert not isinstance(provider, trace.ProxyTracerProvider)
    assert setup_tracing(TracingConfig(sample_ratio=0.0), "other", exporter=InMemorySpanExporter())
    assert trace.get_tracer_provider() is provider


def test_an_otlp_endpoint_installs_a_batch_exporter_without_contacting_it() -> None:
    config = TracingConfig(endpoint="http://127.0.0.1:9/", headers={"api-key": "k"})
    assert setup_tracing(config, "gateway", resource={"app.region": "eu"})
    assert tracing.tracing_enabled()
    shutdown_tracing()  # nothing was recorded, so nothing is sent
    assert not tracing.tracing_enabled()


def test_an_escaping_exception_is_recorded_as_an_error() -> None:
    exporter = traced()
    with pytest.raises(RuntimeError), span("failing"):
        raise RuntimeError("boom")
    (failed,) = exporter.get_finished_spans()
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.events[0].name == "exception"


async def test_spans_work_in_async_code_and_concurrent_requests_get_their_own_traces() -> None:
    exporter = traced()

    async def request(n: int) -> None:
        with span("http", n=n):
            await asyncio.sleep(0)
            with span("replica", n=n):
                await asyncio.sleep(0)

    await asyncio.gather(request(1), request(2))
    spans = exporter.get_finished_spans()
    traces: dict[object, set[int]] = {}
    for s in spans:
        assert s.attributes is not None and s.context is not None
        traces.setdefault(s.attributes["n"], set()).add(s.context.trace_id)
    assert all(len(ids) == 1 for ids in traces.values())
    assert traces[1] != traces[2]


async def test_a_traced_stream_is_one_span_around_its_items_with_the_work_as_children() -> None:
    exporter = traced()

    async def relay() -> AsyncIterator[bytes]:
        with span("handle.call"):  # done while producing the first item
            pass
        yield b"a"
        yield b"b"

    with span("http") as http:
        stream = traced_stream("relay", relay(), model="m")
    assert [piece async for piece in stream] == [b"a", b"b"]
    spans = by_name(exporter)
    assert spans["relay"].parent is not None
    assert spans["relay"].parent.span_id == http.get_span_context().span_id
    assert spans["handle.call"].parent is not None
    assert spans["handle.call"].parent.span_id == spans["relay"].context.span_id
    assert spans["relay"].attributes == {"model": "m", "stream.items": 2}


async def test_a_traced_stream_records_a_failure_and_ends_when_closed_early() -> None:
    exporter = traced()

    async def broken() -> AsyncIterator[int]:
        yield 1
        raise ValueError("peer went away")

    stream = traced_stream("broken", broken())
    with pytest.raises(ValueError):
        async for _ in stream:
            pass
    closed = traced_stream("closed", broken())
    assert await anext(closed) == 1
    await closed.aclose()  # type: ignore[attr-defined]
    spans = by_name(exporter)
    assert spans["broken"].status.status_code is StatusCode.ERROR
    assert spans["closed"].status.status_code is StatusCode.UNSET


def test_config_reads_opentelemetry_variables() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector.example:4318/",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.25",
        "OTEL_SERVICE_NAME": "app-eu",
        "OTEL_EXPORTER_OTLP_HEADERS": "Api-Key=s%3Dcret, x-team = ml",
    }
    config = TracingConfig.from_env(env)
    assert config.enabled and config.traces_url == "https://collector.example:4318/v1/traces"
    assert config.sample_ratio == 0.25 and config.service_name == "app-eu"
    assert config.headers == {"api-key": "s=cret", "x-team": "ml"}
    assert "s=cret" not in repr(config)
    specific = env | {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}
    assert TracingConfig.from_env(specific).traces_url == "http://c:4318/v1/traces"
    assert TracingConfig.from_env(env | {"OTEL_TRACES_SAMPLER": "always_on"}).sample_ratio == 1.0
    assert not TracingConfig.from_env(env | {"OTEL_SDK_DISABLED": "true"}).enabled
    assert not TracingConfig.from_env(env | {"OTEL_TRACES_EXPORTER": "none"}).enabled
    assert not TracingConfig.from_env({}).enabled


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OTEL_TRACES_SAMPLER_ARG": "1.5"}, "OTEL_TRACES_SAMPLER_ARG"),
        ({"OTEL_TRACES_SAMPLER_ARG": "lots"}, "OTEL_TRACES_SAMPLER_ARG"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "no-equals"}, "OTEL_EXPORTER_OTLP_HEADERS"),
        ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER"),
    ],
)
def test_invalid_variables_fail_naming_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(TracingConfigError, match=named):
        TracingConfig.from_env(env)


def test_config_errors_do_not_echo_credentials(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(TracingConfigError) as info:
        TracingConfig.from_env({"OTEL_EXPORTER_OTLP_HEADERS": "Authorization Bearer s3cret"})
    assert "s3cret" not in str(info.value)
    with caplog.at_level("INFO", logger="app.observability.tracing"):
        setup_tracing(TracingConfig(endpoint="http://user:s3cret@127.0.0.1:9"), "gateway")
    assert "127.0.0.1:9/v1/traces" in caplog.text and "s3cret" not in caplog.text


def test_the_config_section_rejects_unknown_fields_and_bad_values() -> None:
    with pytest.raises(ValueError, match="sample_ratio"):
        TracingConfig(sample_ratio=2)
    with pytest.raises(ValueError, match="endpoint"):
        TracingConfig(endpoint="grpc://collector:4317")
    with pytest.raises(ValueError, match="sampler"):
        TracingConfig.model_validate({"sampler": "always_on"})
