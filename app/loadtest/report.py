"""The load test's outputs: result.json and a self-contained report.html with inline SVG plots."""

from __future__ import annotations

import json
import time
from html import escape
from pathlib import Path

from app.loadtest.analysis import StageStats
from app.loadtest.result import LoadTestResult
from app.loadtest.svg import line_chart

STYLE = """
body{font-family:sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em} td,th{border:1px solid #ccc;padding:3px 7px}
th{background:#f3f3f3} td.n{text-align:right} tr.broken td{background:#fdecea}
.charts{display:flex;flex-wrap:wrap;gap:12px} .note{color:#a33}
pre{background:#f7f7f7;padding:8px;font-size:.8em;overflow-x:auto}
"""


def write_report(result: LoadTestResult, out_dir: Path) -> tuple[Path, Path]:
    """Write result.json and report.html into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "result.json", out_dir / "report.html"
    json_path.write_text(json.dumps(result.model_dump(mode="json"), indent=2) + "\n")
    html_path.write_text(render_html(result))
    return json_path, html_path


def render_html(result: LoadTestResult) -> str:
    sections = [
        f"<h1>Load test of {escape(result.base_url)}</h1>",
        _overview(result),
        "<h2>Recommendations</h2><ul>"
        + "".join(f"<li>{escape(text)}</li>" for text in result.recommendations)
        + "</ul>",
        '<h2>Plots</h2><div class="charts">' + "".join(_charts(result)) + "</div>",
        "<h2>Stages</h2>" + _stage_table(result),
        "<h2>Requests by kind</h2>" + _kind_table(result.stages),
        "<h2>Configuration</h2><pre>"
        + escape(json.dumps({"models": result.models, **result.config}, indent=2))
        + "</pre>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Load test {escape(result.base_url)}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(sections)}</body></html>\n"
    )


def _overview(result: LoadTestResult) -> str:
    bp = result.breaking_point
    if bp is None:
        breaking = "none: no stage crossed the thresholds"
    else:
        capacity = (
            "" if bp.capacity_rps is None else f"; capacity about {bp.capacity_rps:.1f} req/s"
        )
        breaking = f"stage {bp.stage + 1} ({bp.label}): {'; '.join(bp.reasons)}{capacity}"
    index = result.scalability.index
    rows = [
        (
            "Run",
            f"{_time(result.started_at)} to {_time(result.finished_at)}, engine {result.engine}",
        ),
        ("Models", ", ".join(f"{kind}: {model}" for kind, model in result.models.items())),
        ("Breaking point", breaking),
        ("Scalability index", "-" if index is None else f"{index:.2f} (1 = linear)"),
        ("Resources", result.resources_note or result.resources_source),
    ]
    notes = "".join(f'<p class="note">{escape(note)}</p>' for note in result.notes)
    body = "".join(f"<tr><th>{k}</th><td>{escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>{notes}"


def _charts(result: LoadTestResult) -> list[str]:
    stages = result.stages
    labels = [s.label for s in stages]
    marker = result.breaking_point.stage if result.breaking_point else None
    thresholds = result.config.get("thresholds", {})
    first = next((s for s in stages if s.ran and s.offered), None)
    ideal = [first.ok_rps / first.offered * s.offered for s in stages] if first else []
    charts = [
        line_chart(
            "Throughput vs offered load",
            [f"{s.offered:g}" for s in stages],
            {
                "goodput": [_ran(s, s.ok_rps) for s in stages],
                "all responses": [_ran(s, s.achieved_rps) for s in stages],
                "linear": ideal,
            },
            f"req/s (x: offered {result.load_unit})",
            marker=marker,
        ),
        line_chart(
            "Latency per stage",
            labels,
            {p: [getattr(s.latency_ms, p) for s in stages] for p in ("p50", "p95", "p99")},
            "ms",
            threshold=thresholds.get("p95_ms"),
            marker=marker,
        ),
        line_chart(
            "Streams: first token and inter-token latency",
            labels,
            {
                "TTFT p50": [s.ttft_ms.p50 for s in stages],
                "TTFT p95": [s.ttft_ms.p95 for s in stages],
                "ITL p50": [s.itl_ms.p50 for s in stages],
                "ITL p95": [s.itl_ms.p95 for s in stages],
            },
            "ms",
            threshold=thresholds.get("ttft_p95_ms"),
            marker=marker,
        ),
        line_chart(
            "Error rate per stage",
            labels,
            {"errors": [_ran(s, 100 * s.error_rate) for s in stages]},
            "% of requests",
            threshold=100 * thresholds.get("error_rate", 0.0),
            marker=marker,
        ),
    ]
    if any(s.resources for s in stages):
        charts.append(_resource_chart(result, labels, marker))
    return charts


def _resource_chart(result: LoadTestResult, labels: list[str], marker: int | None) -> str:
    stages = result.stages
    return line_chart(
        f"Resource use per stage ({result.resources_source})",
        labels,
        {
            "CPU mean": [s.resources.cpu_mean if s.resources else None for s in stages],
            "memory mean": [s.resources.memory_mean if s.resources else None for s in stages],
            "GPU mean": [s.resources.gpu_mean if s.resources else None for s in stages],
        },
        "%",
        marker=marker,
    )


_STAGE_COLUMNS = (
    "stage", "load", "seconds", "requests", "req/s", "goodput", "p50", "p95", "p99",
    "TTFT p95", "ITL p95", "errors", "by status", "CPU %", "mem %", "GPU %", "breaches",
)  # fmt: skip


def _stage_table(result: LoadTestResult) -> str:
    head = "".join(f"<th>{c}</th>" for c in _STAGE_COLUMNS)
    rows = []
    for s in result.stages:
        use = s.resources
        cells = [
            str(s.index + 1),
            s.label,
            _seconds(s),
            str(s.requests),
            f"{s.achieved_rps:.2f}",
            f"{s.ok_rps:.2f}",
            _num(s.latency_ms.p50),
            _num(s.latency_ms.p95),
            _num(s.latency_ms.p99),
            _num(s.ttft_ms.p95),
            _num(s.itl_ms.p95),
            f"{100 * s.error_rate:.1f}%",
            ", ".join(f"{k}: {v}" for k, v in s.errors.items()) or "-",
            _num(use.cpu_mean if use else None),
            _num(use.memory_mean if use else None),
            _num(use.gpu_mean if use else None),
            "; ".join(s.breaches) or "-",
        ]
        css = ' class="broken"' if s.breaches else ""
        rows.append(f"<tr{css}>" + "".join(_cell(c) for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _kind_table(stages: list[StageStats]) -> str:
    kinds = sorted({kind for s in stages for kind in s.by_kind})
    head = "<th>stage</th>" + "".join(f"<th>{k}: n / errors / p95 ms</th>" for k in kinds)
    rows = []
    for s in stages:
        cells = [s.label]
        for kind in kinds:
            k = s.by_kind.get(kind)
            cells.append(f"{k.requests} / {k.errors} / {_num(k.latency_ms.p95)}" if k else "-")
        rows.append("<tr>" + "".join(_cell(c) for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _cell(text: str) -> str:
    numeric = text.replace(".", "", 1).replace("%", "").isdigit()
    return f'<td class="n">{escape(text)}</td>' if numeric else f"<td>{escape(text)}</td>"


def _seconds(stage: StageStats) -> str:
    if not stage.ran:
        return "not run"
    return f"{stage.duration_s:.1f}" + (" (cut short)" if stage.cut_short else "")


def _ran(stage: StageStats, value: float) -> float | None:
    return value if stage.ran else None


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _time(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
