"""Observability on real Ray Serve: a request's trace from the gateway's HTTP entry to the runner
under the client's trace id, exported over OTLP/HTTP to a collector in this process; the client's
x-request-id on the response and in the replica's log; and the request-path metrics on Ray's
Prometheus endpoint with their labels, after requests of each kind on both base URLs.

A model and a gateway of their own (`traced-echo`, `/traced`), deployed with the OTLP endpoint,
full sampling and unbuffered request logs in their environment.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray

from app.catalog.cards import Catalogue, ModelCard, load_catalogue
from tests.integration.conftest import ROOT
from tests.integration.support import wait_until

MODEL = "traced-echo"
GATEWAY = "traced-gateway"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
REQUEST_ID = "obs-test-request-0042"


class Collector(ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver: keeps (trace id, span id, parent id, name, service)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Receive)
        self.spans: list[dict[str, str]] = []


class _Receive(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        export = ExportTraceServiceRequest.FromString(body)
        assert isinstance(self.server, Collector)
        for resource_spans in export.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope in resource_spans.scope_spans:
                for s in scope.spans:
                    self.server.spans.append(
                        {
                            "trace": s.trace_id.hex(),
                            "span": s.span_id.hex(),
                            "parent": s.parent_span_id.hex(),
                            "name": s.name,
                            "service": service,
                        }
                    )
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def traced(serving: str) -> Iterator[tuple[str, Collector]]:
    """The base URL with the traced model and gateway deployed, and the collector."""
    from ray import serve

    from app.serving.builder import gateway_application, model_application
    from app.serving.deploy import wait_running

    collector = Collector()
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.server_address[1]}",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # read by replica_env() when the applications are built
    catalogue = load_catalogue(ROOT / "models")
    base = catalogue.get("echo")
    assert base is not None
    card = ModelCard.model_validate(
        # Up to two replicas: the fleet's router places its requests (a router.choose span).
        base.model_dump(mode="json") | {"id": MODEL, "replicas": {"min": 1, "max": 2}}
    )
    try:
        serve.run(
            model_application(card, catalogue.directory),
            name=card.deployment_name,
            route_prefix=f"/models/{MODEL}",
            blocking=False,
        )
        listed = Catalogue(directory=catalogue.directory, cards={MODEL: card})
        serve.run(gateway_application(listed), name=GATEWAY, route_prefix="/traced", blocking=False)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        wait_running([card.deployment_name, GATEWAY], timeout_s=300)
        yield serving, collector
    finally:
        serve.delete(GATEWAY)
        serve.delete(card.deployment_name)
        collector.shutdown()


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "trace me"}]} | extra


def test_one_trace_runs_from_the_gateway_to_the_runner(traced: tuple[str, Collector]) -> None:
    base, collector = traced
    reply = httpx.post(
        f"{base}/traced/v1/chat/completions",
        json=chat(),
        headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01", "x-request-id": REQUEST_ID},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-request-id"] == REQUEST_ID
    wanted = {
        "POST /v1/chat/completions",
        "gateway.chat",
        "router.choose",
        "replica.chat",
        "runner.chat",
    }

    def names() -> set[str]:
        return {s["name"] for s in collector.spans if s["trace"] == TRACE_ID}

    with contextlib.suppress(AssertionError):
        wait_until(lambda: wanted <= names(), timeout=60, what="the trace's spans")
    assert wanted <= names(), names()
    spans = {s["name"]: s for s in collector.spans if s["trace"] == TRACE_ID}
    # The entry's parent is the client's span; each hop's parent is the hop before it.
    assert spans["POST /v1/chat/completions"]["parent"] == CLIENT_SPAN
    assert spans["gateway.chat"]["parent"] == spans["POST /v1/chat/completions"]["span"]
    assert spans["router.choose"]["parent"] == spans["gateway.chat"]["span"]
    assert spans["replica.chat"]["parent"] == spans["gateway.chat"]["span"]
    assert spans["runner.chat"]["parent"] == spans["replica.chat"]["span"]
    assert spans["gateway.chat"]["service"] == "gateway"
    assert spans["runner.chat"]["service"] == MODEL


def test_the_request_id_reaches_the_replicas_log(traced: tuple[str, Collector]) -> None:
    base, _ = traced
    request_id = f"{REQUEST_ID}-log"
    reply = httpx.post(
        f"{base}/models/{MODEL}/v1/chat/completions",
        json=chat(),
        headers={"x-request-id": request_id},
        timeout=60,
    )
    assert reply.status_code == 200 and reply.headers["x-request-id"] == request_id
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"

    def logged() -> bool:
        return any(
            request_id in path.read_text(errors="replace")
            for path in logs.glob(f"replica_model-{MODEL}_*.log")
        )

    wait_until(logged, timeout=30, what="the request id in the replica's log")


def test_request_path_metrics_are_exported_with_their_labels(
    traced: tuple[str, Collector],
) -> None:
    base, _ = traced
    for url in (f"{base}/traced/v1", f"{base}/models/{MODEL}/v1"):
        assert httpx.post(f"{url}/chat/completions", json=chat(), timeout=60).status_code == 200
        streamed = httpx.post(f"{url}/chat/completions", json=chat(stream=True), timeout=60)
        assert streamed.status_code == 200
        missing = httpx.post(f"{url}/chat/completions", json=chat(model="nope"), timeout=60)
        assert missing.status_code == 404
    port = ray._private.worker.global_worker.node.metrics_export_port
    expected = [
        ("ray_app_http_requests_total", ('base="gateway"', f'model="{MODEL}"', 'status="200"')),
        ("ray_app_http_requests_total", ('base="model"', f'model="{MODEL}"', 'status="200"')),
        ("ray_app_http_requests_total", ('base="gateway"', 'model="other"', 'status="404"')),
        ("ray_app_http_request_duration_seconds_bucket", ('stream="true"', 'base="model"')),
        ("ray_app_stream_first_token_seconds_bucket", (f'model="{MODEL}"',)),
        ("ray_app_prompt_tokens_total", (f'model="{MODEL}"',)),
        ("ray_app_completion_tokens_total", (f'model="{MODEL}"',)),
        ("ray_fleet_routing_decisions_total", ()),
    ]

    def missing_series() -> list[str]:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        lines = text.splitlines()
        return [
            f"{name}{{{','.join(labels)}}}"
            for name, labels in expected
            if not any(
                line.startswith(name + "{") and all(label in line for label in labels)
                for line in lines
            )
        ]

    deadline = time.monotonic() + 60
    while missing_series() and time.monotonic() < deadline:
        time.sleep(2)
    assert not missing_series()
