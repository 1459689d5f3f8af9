"""The result and its files: every stage in result.json and report.html, nothing fetched."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from app.loadtest.config import RequestKind, build_config
from app.loadtest.records import END, OK, RequestRecord, StageMark
from app.loadtest.report import render_html, write_report
from app.loadtest.resources import ResourceSample
from app.loadtest.result import LoadTestResult, summarise
from app.loadtest.svg import line_chart, nice_ceiling

T0 = 1_000_000.0
MODELS = {RequestKind.CHAT: "echo", RequestKind.STREAM: "echo"}


def result(stopped: str | None = None) -> LoadTestResult:
    config = build_config(
        {
            "base_url": "http://127.0.0.1:8000",
            "stages": [{"duration_s": 10, "users": n} for n in (1, 2, 4)],
            "thresholds": {"p95_ms": 500},
        }
    )
    records = []
    for stage, (rps, latency) in enumerate([(10, 100), (20, 200), (22, 900)]):
        for i in range(rps * 10):
            start = T0 + stage * 10 + i / rps
            records.append(RequestRecord(RequestKind.CHAT, start, latency, OK))
            records.append(
                RequestRecord(RequestKind.STREAM, start, latency, OK, latency / 4, [5.0, 6.0], 3)
            )
        records.append(RequestRecord(RequestKind.CHAT, T0 + stage * 10 + 1, 2, "503"))
    marks = [StageMark(i, T0 + 10 * i) for i in range(3)] + [StageMark(END, T0 + 30)]
    samples = [ResourceSample(T0 + t, cpu_percent=20 + t) for t in range(0, 30, 2)]
    return summarise(
        config,
        MODELS,
        records,
        marks,
        samples,
        started_at=T0 - 2,
        finished_at=T0 + 31,
        engine="test",
        stopped=stopped,
        resources=("ray", "Ray node metrics from <here>"),
        notes=["generation model echo <first>"],
    )


def test_summary() -> None:
    r = result()
    assert [s.label for s in r.stages] == ["1 user", "2 users", "4 users"]
    assert r.breaking_point is not None and r.breaking_point.stage == 2
    assert r.recommendations[0].startswith("Capacity: about 39")
    assert r.models == {"chat": "echo", "stream": "echo"}
    assert "api_key" not in r.config


def test_files_hold_every_stage(tmp_path: Path) -> None:
    json_path, html_path = write_report(result(), tmp_path / "out")
    data = json.loads(json_path.read_text())
    assert [s["label"] for s in data["stages"]] == ["1 user", "2 users", "4 users"]
    assert data["breaking_point"]["stage"] == 2
    assert data["scalability"]["steps"][0]["index"] is not None
    assert data["stages"][0]["resources"]["cpu_mean"] is not None
    html = html_path.read_text()
    for label in ("1 user", "2 users", "4 users"):
        assert f"<td>{label}</td>" in html
    assert html.count("<svg") == 5  # throughput, latency, streams, errors, resources
    assert 'class="broken"' in html


def test_html_is_self_contained_and_escaped() -> None:
    html = render_html(result(stopped="hard deadline (--max-duration) reached"))
    assert "<script" not in html
    assert not re.search(r'(src|href)="https?:', html)
    assert "@import" not in html and "url(" not in html
    assert "&lt;first&gt;" in html and "<first>" not in html
    assert "the run was stopped early: hard deadline" in html


def test_nice_ceiling() -> None:
    tops = [nice_ceiling(v) for v in (0, 0.7, 3, 7, 11, 100, 105, 260, 2000)]
    assert tops == pytest.approx([1, 0.8, 3.2, 8, 12, 100, 120, 320, 2000])


def test_line_chart_breaks_lines_at_missing_points() -> None:
    svg = line_chart(
        "t", ["a", "b", "c", "d"], {"s": [1.0, None, 2.0, 3.0]}, "ms", threshold=2.5, marker=3
    )
    assert svg.count("<polyline") == 1  # a-b is broken; c-d is one line
    assert svg.count("<circle") == 3
    assert "threshold 2.5" in svg and "breaking point" in svg
