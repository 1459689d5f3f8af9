"""OpenTelemetry traces of the request path: their configuration, a once-per-process setup, and
the helpers each hop calls (span, extract, inject, traced_stream). Off unless an OTLP endpoint
is configured; off, every helper returns after one check of a module global.

Replicas are separate processes, so a trace crosses a Serve handle call or a cross-region
forward as a W3C traceparent in a small dict (a handle kwarg, or the forward's headers), never
as in-process context. The sampling decision is a function of the trace id, so every hop of one
request takes the same one.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    INVALID_SPAN,
    Span,
    SpanKind,
    Status,
    StatusCode,
    Tracer,
    format_span_id,
    format_trace_id,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler

logger = logging.getLogger(__name__)
T = TypeVar("T")
AttrValue = str | bool | int | float | None

TRACEPARENT = "traceparent"
TRACES_PATH = "/v1/traces"
_PROPAGATOR = TraceContextTextMapPropagator()
# The OTEL_* variable each field is read from, first match wins (OpenTelemetry's own names, so
# a collector's injected environment works unchanged).
_ENV: dict[str, tuple[str, ...]] = {
    "endpoint": ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"),
    "sample_ratio": ("OTEL_TRACES_SAMPLER_ARG",),
    "service_name": ("OTEL_SERVICE_NAME",),
    "headers": ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"),
}
_FIXED_SAMPLERS = {
    "always_on": 1.0,
    "parentbased_always_on": 1.0,
    "always_off": 0.0,
    "parentbased_always_off": 0.0,
}
_RATIO_SAMPLERS = {"traceidratio", "parentbased_traceidratio"}


class TracingConfigError(ValueError):
    """The tracing configuration is invalid; the message names the field or variable."""


class TracingConfig(BaseModel):
    """Where spans go and how many are kept: the fleet spec's `tracing` section, else the
    OTEL_* environment (TracingConfig.from_env)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    endpoint: str | None = Field(
        None,
        description="OTLP/HTTP collector, e.g. http://otel-collector:4318; spans are posted to "
        "its /v1/traces. Unset: tracing is off.",
    )
    sample_ratio: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Share of new traces recorded. OpenTelemetry's default records every "
        "trace, which costs too much at serving rates.",
    )
    service_name: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="The spans' service.name; default: the process's role (setup_tracing).",
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        repr=False,
        description="Sent with every export, e.g. a collector's API key.",
    )
    timeout_s: float = Field(10.0, gt=0, le=120, description="One export's deadline.")
    honour_client_sampling: bool = Field(
        True,
        description="Follow the sampled flag of a client's traceparent (W3C). False: every hop "
        "decides by sample_ratio alone, so a client can neither force recording nor stop it.",
    )

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value.rstrip("/")

    @property
    def enabled(self) -> bool:
        return self.endpoint is not None

    @property
    def traces_url(self) -> str:
        """The URL spans are posted to: the endpoint's /v1/traces, unless it names it already."""
        if self.endpoint is None:
            raise TracingConfigError("tracing has no endpoint")
        if self.endpoint.endswith(TRACES_PATH):
            return self.endpoint
        return self.endpoint + TRACES_PATH

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TracingConfig:
        """OpenTelemetry's variables: OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, _HEADERS,
        OTEL_TRACES_SAMPLER[_ARG], OTEL_SERVICE_NAME; OTEL_SDK_DISABLED=true or
        OTEL_TRACES_EXPORTER=none turn tracing off."""
        env = os.environ if env is None else env
        if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
            return cls()
        if env.get("OTEL_TRACES_EXPORTER", "").lower() == "none":
            return cls()
        values: dict[str, Any] = {}
        names: dict[str, str] = {}
        for field, variables in _ENV.items():
            found = next((v for v in variables if env.get(v)), None)
            if found is not None:
                values[field], names[field] = env[found], found
        if "headers" in values:
            values["headers"] = _parse_headers(values["headers"], names["headers"])
        sampler = env.get("OTEL_TRACES_SAMPLER", "").lower()
        if sampler in _FIXED_SAMPLERS:
            values["sample_ratio"], names["sample_ratio"] = _FIXED_SAMPLERS[sampler], sampler
        elif sampler and sampler not in _RATIO_SAMPLERS:
            raise TracingConfigError(f"OTEL_TRACES_SAMPLER={sampler!r} is not supported here")
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{names.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}" for e in exc.errors()
            )
            raise TracingConfigError(f"invalid tracing configuration: {problems}") from exc


def _parse_headers(raw: str, variable: str) -> dict[str, str]:
    """W3C baggage-style `key=value,key2=value2`, values URL-encoded (the OTLP convention)."""
    headers: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            # The item itself is not echoed: it is likely a credential.
            raise TracingConfigError(f"{variable}: expected comma-separated key=value pairs")
        headers[key.strip().lower()] = unquote(value.strip())
    return headers


# This process's tracer; None: tracing is off. A module global so that the off path of every
# helper is one global read and one comparison.
_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_lock = threading.Lock()


def setup_tracing(
    config: TracingConfig | None,
    service_name: str,
    *,
    resource: Mapping[str, str] | None = None,
    exporter: SpanExporter | None = None,
) -> bool:
    """Install this process's tracer provider, once; True when tracing is on.

    `config` None reads the OTEL_* environment. `service_name` is the process's role ("gateway",
    the model id) unless the config names one; `resource` adds attributes every span carries
    (region, replica). `exporter` replaces OTLP and gets each span as it ends (tests,
    debugging). A later call while tracing is on changes nothing.
    """
    global _tracer, _provider
    with _lock:
        if _tracer is not None:
            return True
        chosen = TracingConfig.from_env() if config is None else config
        if exporter is None and not chosen.enabled:
            return False
        provider = _provider_for(chosen, service_name, resource or {}, exporter)
        # Adopted as the global provider only if nobody set one (Serve's own tracing may have):
        # our spans come from our tracer either way, and nest under whatever span is current.
        if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            trace.set_tracer_provider(provider)
        _provider, _tracer = provider, provider.get_tracer("app")
    where = "a test exporter" if exporter is not None else _without_userinfo(chosen.traces_url)
    logger.info("tracing on: %s, sampling %g, to %s", service_name, chosen.sample_ratio, where)
    return True


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _provider_for(
    config: TracingConfig,
    service_name: str,
    resource: Mapping[str, str],
    exporter: SpanExporter | None,
) -> TracerProvider:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    attributes = {**resource, SERVICE_NAME: config.service_name or service_name}
    provider = TracerProvider(sampler=sampler_for(config), resource=Resource.create(attributes))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        # A bounded queue exported from a background thread: a slow or absent collector drops
        # spans, it never holds up a request.
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(config)))
    return provider


def _otlp_exporter(config: TracingConfig) -> SpanExporter:
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise TracingConfigError(
            "tracing.endpoint is set but opentelemetry-exporter-otlp-proto-http is not installed"
        ) from exc
    return OTLPSpanExporter(
        endpoint=config.traces_url, headers=dict(config.headers) or None, timeout=config.timeout_s
    )


def sampler_for(config: TracingConfig) -> Sampler:
    """Parent-based, ratio by trace id at the root. Not honouring the client's flag, remote
    parents are sampled by the same ratio: deterministic in the trace id, so the hops of one
    request still agree with each other."""
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    ratio = TraceIdRatioBased(config.sample_ratio)
    if config.honour_client_sampling:
        return ParentBased(ratio)
    return ParentBased(ratio, remote_parent_sampled=ratio, remote_parent_not_sampled=ratio)


def shutdown_tracing() -> None:
    """Export what is queued and turn tracing off in this process (a replica stopping; tests)."""
    global _tracer, _provider
    with _lock:
        provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def tracing_enabled() -> bool:
    return _tracer is not None


class _NoSpan(AbstractContextManager[Span]):
    """What span() returns with tracing off: a shared object whose `with` yields the invalid
    span, so callers may set attributes on it without checking."""

    __slots__ = ()

    def __enter__(self) -> Span:
        return INVALID_SPAN

    def __exit__(self, *exc_info: object) -> None:
        return None


_NO_SPAN = _NoSpan()


def span(
    name: str,
    /,
    *,
    parent: Context | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    **attrs: AttrValue,
) -> AbstractContextManager[Span]:
    """`with span("router.choose", model=m) as s:` a span, current for the block (a plain
    `with`, in sync code or across awaits within one task); an escaping exception is recorded
    on it. Under a span this process does not sample, none is made. `parent`:
    a context from extract() (a request's entry); default: the current span. Attributes that
    are None are left out."""
    tracer = _tracer
    if tracer is None or (parent is None and _inside_unsampled()):
        return _NO_SPAN
    return _Current(tracer.start_span(name, context=parent, kind=kind, attributes=_clean(attrs)))


class _Current(AbstractContextManager[Span]):
    """A started span made current for a `with` block and ended after it. A class rather than
    the SDK's start_as_current_span (two generator context managers): half the cost of an
    unsampled span, the one every request pays per process."""

    __slots__ = ("_span", "_token")

    def __init__(self, started: Span) -> None:
        self._span = started

    def __enter__(self) -> Span:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        try:
            # Exception only: GeneratorExit and cancellation end a span, they are not errors.
            if isinstance(exc, Exception) and self._span.is_recording():
                _record_failure(self._span, exc)
        finally:
            otel_context.detach(self._token)
            self._span.end()


def _record_failure(failed: Span, exc: Exception) -> None:
    failed.record_exception(exc)
    failed.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def _inside_unsampled() -> bool:
    """Whether the current span is this process's and not sampled: then no span under it is
    recorded (parent-based sampling), so none is made. What a request not sampled pays is one
    span per process, however many nested spans its path names."""
    current = trace.get_current_span().get_span_context()
    return current.is_valid and not current.is_remote and not current.trace_flags.sampled


def _clean(attrs: Mapping[str, AttrValue]) -> dict[str, str | bool | int | float]:
    return {key: value for key, value in attrs.items() if value is not None}


def extract(headers: Mapping[str, str] | None) -> Context | None:
    """The remote parent in HTTP headers or a carried dict (its `traceparent`), for span(...,
    parent=); None when tracing is off or there is no valid one (the span then starts or
    continues the current trace). Starlette's Headers work as they are (case-insensitive)."""
    if _tracer is None or not headers or headers.get(TRACEPARENT) is None:
        return None
    found = _PROPAGATOR.extract(headers)
    return found if trace.get_current_span(found).get_span_context().is_valid else None


def inject(carrier: dict[str, str]) -> dict[str, str]:
    """`carrier` with the current span's traceparent (and tracestate) added: the dict a Serve
    handle call carries as a kwarg, or a forward's headers. Unchanged when tracing is off."""
    if _tracer is not None:
        _PROPAGATOR.inject(carrier)
    return carrier


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, or None (tracing off, no span)."""
    if _tracer is None:
        return None
    return inject({}).get(TRACEPARENT)


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the current span, for log lines; None when there is none.
    An unsampled span has them too, so they tie one request's log lines across processes."""
    if _tracer is None:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format_trace_id(context.trace_id), format_span_id(context.span_id)


def traced_stream(
    name: str,
    items: AsyncIterator[T],
    /,
    *,
    parent: Context | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    **attrs: AttrValue,
) -> AsyncIterator[T]:
    """`items` inside one span that starts at the first item and ends with the stream; work the
    stream does to produce an item (a handle call, a forward) is its child. The span is current
    only while the next item is produced: a stream may be consumed and closed by different
    tasks, and a context attached in one task cannot be detached in another."""
    tracer = _tracer
    if tracer is None or (parent is None and _inside_unsampled()):
        return items
    start = parent if parent is not None else otel_context.get_current()
    return _traced(tracer, name, start, kind, _clean(attrs), items)


async def _traced(
    tracer: Tracer,
    name: str,
    parent: Context,
    kind: SpanKind,
    attrs: dict[str, str | bool | int | float],
    items: AsyncIterator[T],
) -> AsyncIterator[T]:
    current = tracer.start_span(name, context=parent, kind=kind, attributes=attrs)
    inside = trace.set_span_in_context(current, parent)
    count = 0
    try:
        while True:
            token = otel_context.attach(inside)
            try:
                item = await anext(items)
            except StopAsyncIteration:
                return
            finally:
                otel_context.detach(token)
            count += 1
            yield item
    except Exception as exc:  # not GeneratorExit or cancellation: a consumer leaving is normal
        _record_failure(current, exc)
        raise
    finally:
        current.set_attribute("stream.items", count)
        current.end()
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()
