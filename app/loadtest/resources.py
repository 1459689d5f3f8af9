"""The cluster's CPU, memory and GPU use while a load test runs, scraped from Ray's Prometheus
endpoints (so the CLI never joins the cluster), or this machine's from psutil when none answers.
"""

from __future__ import annotations

import json
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

SCRAPE_TIMEOUT_S = 2.0
PROBE_TIMEOUT_S = 1.0
Metric = tuple[str, dict[str, str], float]


@dataclass(frozen=True)
class ResourceSample:
    """Cluster-wide use at wall-clock `at`: CPU weighted by each node's cores, memory summed,
    GPU averaged over devices (None where nothing reports it)."""

    at: float
    cpu_percent: float | None = None
    memory_used_bytes: float | None = None
    memory_total_bytes: float | None = None
    gpu_percent: float | None = None
    gpus: int = 0
    gpu_memory_used_bytes: float | None = None
    nodes: int = 0

    @property
    def memory_percent(self) -> float | None:
        if self.memory_used_bytes is None or not self.memory_total_bytes:
            return None
        return 100 * self.memory_used_bytes / self.memory_total_bytes


class ResourceSampler(ABC):
    """Reads the resource use now; `source` and `note` say where the numbers come from."""

    source: str = "unknown"
    note: str = ""

    @abstractmethod
    def sample(self) -> ResourceSample | None:
        """The use now, or None if it could not be read this time."""

    def close(self) -> None:  # noqa: B027 - an optional hook, a no-op unless overridden
        """Release anything the sampler holds (a no-op by default)."""


class RaySampler(ResourceSampler):
    """Ray's node metrics from the metrics export endpoints of the cluster's nodes."""

    source = "ray"

    def __init__(
        self,
        urls: list[str],
        get_curr_time_s: Callable[[], float] = time.time,
        timeout_s: float = SCRAPE_TIMEOUT_S,
    ) -> None:
        self.urls = urls
        self.note = f"Ray node metrics from {', '.join(urls)}"
        self.get_curr_time_s = get_curr_time_s
        self._client = httpx.Client(timeout=timeout_s)

    def sample(self) -> ResourceSample | None:
        metrics: list[Metric] = []
        for url in self.urls:
            try:
                response = self._client.get(url)
                response.raise_for_status()
            except httpx.HTTPError:
                continue
            metrics += parse_metrics(response.text)
        return aggregate(metrics, self.get_curr_time_s())

    def close(self) -> None:
        self._client.close()


class LocalSampler(ResourceSampler):
    """This machine's CPU and memory: what is left when no Ray endpoint answers."""

    source = "local"
    note = (
        "no Ray metrics endpoint answered: CPU and memory are this machine's (psutil), "
        "GPU use is not measured; pass --metrics-url for the cluster's"
    )

    def __init__(self, get_curr_time_s: Callable[[], float] = time.time) -> None:
        self.get_curr_time_s = get_curr_time_s
        psutil.cpu_percent(interval=None)  # the first call only starts the measurement

    def sample(self) -> ResourceSample | None:
        memory = psutil.virtual_memory()
        return ResourceSample(
            at=self.get_curr_time_s(),
            cpu_percent=psutil.cpu_percent(interval=None),
            memory_used_bytes=float(memory.total - memory.available),
            memory_total_bytes=float(memory.total),
            nodes=1,
        )


def parse_metrics(text: str) -> list[Metric]:
    """The `ray_node_*` samples of a Prometheus text page."""
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError:
        return []
    return [
        (sample.name, dict(sample.labels), float(sample.value))
        for family in families
        if family.name.startswith("ray_node_")
        for sample in family.samples
    ]


def aggregate(metrics: Iterable[Metric], at: float) -> ResourceSample | None:
    """One cluster sample from node metrics; a node scraped twice (two endpoints on one
    machine) counts once, keyed by its ip label (and GPU index)."""
    values: dict[str, dict[tuple[str, str], float]] = {}
    for name, labels, value in metrics:
        key = (labels.get("ip", ""), labels.get("GpuIndex", ""))
        values.setdefault(name.removeprefix("ray_"), {})[key] = value
    cpu, cores = values.get("node_cpu_utilization", {}), values.get("node_cpu_count", {})
    if not cpu:
        return None
    weights = {key: cores.get(key, 1.0) for key in cpu}
    gpu = values.get("node_gpus_utilization", {})
    used, total = values.get("node_mem_used", {}), values.get("node_mem_total", {})
    gram = values.get("node_gram_used", {})
    return ResourceSample(
        at=at,
        cpu_percent=sum(cpu[k] * weights[k] for k in cpu) / (sum(weights.values()) or 1.0),
        memory_used_bytes=sum(used.values()) if used else None,
        memory_total_bytes=sum(total.values()) if total else None,
        gpu_percent=sum(gpu.values()) / len(gpu) if gpu else None,
        gpus=len(gpu),
        gpu_memory_used_bytes=sum(gram.values()) if gram else None,
        nodes=len(cpu),
    )


def discover_metrics_urls(ray_dir: Path | None = None) -> list[str]:
    """Metrics endpoints of a running cluster, from files Ray writes (no connection to it):
    the Prometheus discovery file (every node, written by Ray's dashboard), else the export
    ports the nodes on this machine recorded in the latest session."""
    ray_dir = ray_dir or Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray"
    urls: list[str] = []
    try:
        for group in json.loads((ray_dir / "prom_metrics_service_discovery.json").read_text()):
            urls += [f"http://{target}/metrics" for target in group.get("targets", [])]
    except (OSError, ValueError, AttributeError):
        pass
    for port_file in sorted((ray_dir / "session_latest").glob("metrics_export_port_*")):
        try:
            port = int(port_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if port > 0:
            urls.append(f"http://127.0.0.1:{port}/metrics")
    return list(dict.fromkeys(urls))


def choose_sampler(urls: list[str], discover: bool = True) -> ResourceSampler:
    """A RaySampler over the given (else discovered) endpoints that answer with node metrics;
    a LocalSampler when none does."""
    candidates = urls or (discover_metrics_urls() if discover else [])
    with ThreadPoolExecutor(max_workers=8) as pool:  # a stale address costs a timeout each
        answers = list(pool.map(_answers, candidates))
    answering = [url for url, answered in zip(candidates, answers, strict=True) if answered]
    return RaySampler(answering) if answering else LocalSampler()


def _answers(url: str) -> bool:
    probe = RaySampler([url], timeout_s=PROBE_TIMEOUT_S)
    try:
        return probe.sample() is not None
    finally:
        probe.close()


class ResourceMonitor:
    """Samples in a background thread every `interval_s` until stopped."""

    def __init__(self, sampler: ResourceSampler, interval_s: float) -> None:
        self.sampler = sampler
        self.interval_s = interval_s
        self.samples: list[ResourceSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="loadtest-resources", daemon=True)

    def __enter__(self) -> ResourceMonitor:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=SCRAPE_TIMEOUT_S * 2)
        self.sampler.close()

    @property
    def latest(self) -> ResourceSample | None:
        return self.samples[-1] if self.samples else None

    def _loop(self) -> None:
        while not self._stop.is_set():
            sample = self.sampler.sample()
            if sample is not None:
                self.samples.append(sample)
            self._stop.wait(self.interval_s)
