"""Resource sampling: Ray's node metrics parsed and summed, discovery from Ray's files, the
local fallback, and the monitor thread with a fake sampler."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from app.loadtest import resources
from app.loadtest.resources import (
    LocalSampler,
    ResourceMonitor,
    ResourceSample,
    ResourceSampler,
    aggregate,
    choose_sampler,
    discover_metrics_urls,
    parse_metrics,
)

RAY_PAGE = """\
# HELP ray_node_cpu_utilization Total CPU usage on a ray node
# TYPE ray_node_cpu_utilization gauge
ray_node_cpu_utilization{SessionName="s",ip="10.0.0.1"} 90.0
ray_node_cpu_utilization{SessionName="s",ip="10.0.0.2"} 30.0
# TYPE ray_node_cpu_count gauge
ray_node_cpu_count{ip="10.0.0.1"} 2.0
ray_node_cpu_count{ip="10.0.0.2"} 6.0
# TYPE ray_node_mem_used gauge
ray_node_mem_used{ip="10.0.0.1"} 4e9
ray_node_mem_used{ip="10.0.0.2"} 2e9
# TYPE ray_node_mem_total gauge
ray_node_mem_total{ip="10.0.0.1"} 8e9
ray_node_mem_total{ip="10.0.0.2"} 16e9
# TYPE ray_node_gpus_utilization gauge
ray_node_gpus_utilization{GpuIndex="0",ip="10.0.0.2"} 80.0
ray_node_gpus_utilization{GpuIndex="1",ip="10.0.0.2"} 40.0
# TYPE ray_node_gram_used gauge
ray_node_gram_used{GpuIndex="0",ip="10.0.0.2"} 1e9
# TYPE ray_serve_num_http_requests counter
ray_serve_num_http_requests_total{route="/"} 5.0
"""


def test_cluster_sample_from_node_metrics() -> None:
    metrics = parse_metrics(RAY_PAGE)
    assert all(name.startswith("ray_node_") for name, _, _ in metrics)
    sample = aggregate(metrics, at=5.0)
    assert sample is not None
    assert sample.cpu_percent == pytest.approx((90 * 2 + 30 * 6) / 8)  # weighted by cores
    assert sample.memory_percent == pytest.approx(100 * 6e9 / 24e9)
    assert (sample.gpu_percent, sample.gpus, sample.nodes) == (60.0, 2, 2)
    assert sample.gpu_memory_used_bytes == 1e9


def test_a_node_scraped_twice_counts_once() -> None:
    twice = parse_metrics(RAY_PAGE) + parse_metrics(RAY_PAGE)
    sample = aggregate(twice, at=0.0)
    assert sample is not None and sample.nodes == 2 and sample.memory_used_bytes == 6e9


def test_no_node_metrics() -> None:
    assert aggregate(parse_metrics("# nothing here\n"), at=0.0) is None
    assert parse_metrics("garbage {{{") == []


def test_discovery_from_rays_files(tmp_path: Path) -> None:
    session = tmp_path / "session_latest"
    session.mkdir()
    (tmp_path / "prom_metrics_service_discovery.json").write_text(
        '[{"labels": {"job": "ray"}, "targets": ["10.0.0.1:4000", "10.0.0.2:4000"]}]'
    )
    (session / "metrics_export_port_aaa").write_text("4100")
    (session / "metrics_export_port_bbb").write_text("-1")  # metrics disabled on that node
    (session / "metrics_export_port_ccc").write_text("junk")
    assert discover_metrics_urls(tmp_path) == [
        "http://10.0.0.1:4000/metrics",
        "http://10.0.0.2:4000/metrics",
        "http://127.0.0.1:4100/metrics",
    ]
    assert discover_metrics_urls(tmp_path / "absent") == []


def test_local_fallback_when_nothing_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "_answers", lambda url: False)
    sampler = choose_sampler(["http://127.0.0.1:1/metrics"])
    assert isinstance(sampler, LocalSampler) and sampler.source == "local"
    sample = sampler.sample()
    assert sample is not None and sample.cpu_percent is not None and sample.gpu_percent is None
    assert isinstance(choose_sampler([], discover=False), LocalSampler)


def test_ray_sampler_when_an_endpoint_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "_answers", lambda url: url.endswith(":2/metrics"))
    sampler = choose_sampler(["http://127.0.0.1:1/metrics", "http://127.0.0.1:2/metrics"])
    try:
        assert sampler.source == "ray"
        assert sampler.note == "Ray node metrics from http://127.0.0.1:2/metrics"
    finally:
        sampler.close()


class FakeSampler(ResourceSampler):
    source = "fake"

    def __init__(self) -> None:
        self.calls = 0
        self.closed = False

    def sample(self) -> ResourceSample | None:
        self.calls += 1
        return None if self.calls == 1 else ResourceSample(at=float(self.calls), cpu_percent=50)

    def close(self) -> None:
        self.closed = True


def test_monitor_samples_until_stopped() -> None:
    fake = FakeSampler()
    with ResourceMonitor(fake, interval_s=0.01) as monitor:
        deadline = time.monotonic() + 5
        while len(monitor.samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(monitor.samples) >= 3 and monitor.latest is monitor.samples[-1]
    assert fake.closed
    assert monitor.samples[0].at == 2.0  # the failed first read left no sample
