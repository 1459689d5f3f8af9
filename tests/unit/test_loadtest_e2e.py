"""The real engine (Locust, in its own process) for about ten seconds against the stub server
with room for two requests at a time and two waiting: the last stage must break on 503s."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.loadtest.config import build_config
from app.loadtest.resources import LocalSampler
from app.loadtest.run import run_loadtest


@pytest.fixture
def stub() -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "app.loadtest.stub", "--capacity", "2", "--queue", "2",
         "--token-ms", "2"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("listening on"), line
        yield f"http://127.0.0.1:{line.split()[-1]}"
    finally:
        process.kill()
        process.wait()


@pytest.mark.timeout(120)
def test_staged_run_against_the_stub(stub: str, tmp_path: Path) -> None:
    config = build_config(
        {
            "base_url": stub,
            "stages": [{"duration_s": 3, "users": n} for n in (1, 2, 12)],
            "output_tokens": {"kind": "fixed", "tokens": 8},
            "prompt_tokens": {"kind": "uniform", "low": 4, "high": 32},
            # generous on latency: the machine may be busy; the breaking point is the 503s
            "thresholds": {"p95_ms": 5000, "error_rate": 0.05},
            "max_duration_s": 90,
        }
    )
    lines: list[str] = []
    result = run_loadtest(
        config, tmp_path, sampler=LocalSampler(), progress_every_s=2, write=lines.append
    )

    assert result.stopped is None
    assert result.models == {
        "chat": "stub-chat",
        "stream": "stub-chat",
        "completion": "stub-chat",
        "embedding": "stub-embed",
    }
    data = json.loads((tmp_path / "result.json").read_text())
    assert [s["label"] for s in data["stages"]] == ["1 user", "2 users", "12 users"]
    assert all(s["ran"] and s["requests"] > 0 for s in data["stages"])
    first = result.stages[0]
    assert first.errors == {} and set(first.by_kind) == {
        "chat",
        "stream",
        "completion",
        "embedding",
    }
    assert first.ttft_ms.count > 0 and first.itl_ms.count > 0
    assert result.breaking_point is not None and result.breaking_point.stage == 2
    assert "503" in result.stages[2].errors
    html = (tmp_path / "report.html").read_text()
    for label in ("1 user", "2 users", "12 users"):
        assert f"<td>{label}</td>" in html
    assert "stage 3/3: 12 users for 3 s" in lines
    # gevent patches the standard library where Locust is imported: never in this process
    assert "locust" not in sys.modules and "gevent" not in sys.modules
