"""run_loadtest end to end with a fake engine and sampler: model discovery, progress, files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.loadtest import run as run_module
from app.loadtest.config import LoadTestConfig, RequestKind, build_config
from app.loadtest.engine import EngineRun, LoadEngine
from app.loadtest.models import ModelSelectionError
from app.loadtest.records import END, OK, RequestRecord, StageMark
from app.loadtest.resources import ResourceSample, ResourceSampler
from app.loadtest.run import run_loadtest

T0 = 1_000_000.0


class ScriptedEngine(LoadEngine):
    """Writes the records a run of `rps` per stage would have written, and stops early when
    told to, as the hard deadline would."""

    name = "scripted"

    def __init__(self, rps: list[int], stop_after: int | None = None) -> None:
        self.rps = rps
        self.stop_after = stop_after
        self.models: dict[RequestKind, str] = {}

    def run(
        self,
        config: LoadTestConfig,
        models: dict[RequestKind, str],
        out_dir: Path,
        on_poll: Callable[[], None] = lambda: None,
    ) -> EngineRun:
        self.models = models
        path = out_dir / "records.jsonl"
        ran = self.rps[: self.stop_after]
        with path.open("w") as handle:
            for stage, rps in enumerate(ran):
                handle.write(StageMark(stage, T0 + 10 * stage).to_json() + "\n")
                for i in range(rps * 10):
                    start = T0 + 10 * stage + i / rps
                    handle.write(RequestRecord(RequestKind.CHAT, start, 50, OK).to_json() + "\n")
                handle.flush()
                on_poll()
            if self.stop_after is None:
                handle.write(StageMark(END, T0 + 10 * len(ran)).to_json() + "\n")
        on_poll()
        stopped = None if self.stop_after is None else "hard deadline (--max-duration) reached"
        return EngineRun(0, stopped, path, out_dir / "locust.log", 1.0)


class FixedSampler(ResourceSampler):
    source = "fake"
    note = "fixed numbers"

    def sample(self) -> ResourceSample | None:
        return ResourceSample(at=T0, cpu_percent=42)


def config(**fields: Any) -> LoadTestConfig:
    return build_config(
        {
            "base_url": "http://127.0.0.1:9",
            "stages": [{"duration_s": 10, "users": n} for n in (1, 2, 4)],
            "mix": {"chat": 1, "stream": 0, "completion": 0, "embedding": 0},
            "sample_interval_s": 0.01,
            **fields,
        }
    )


def test_run_writes_every_stage(tmp_path: Path) -> None:
    lines: list[str] = []
    engine = ScriptedEngine([10, 20, 40])
    result = run_loadtest(
        config(models={"generation": "echo"}),
        tmp_path,
        engine=engine,
        sampler=FixedSampler(),
        progress_every_s=0,
        write=lines.append,
    )
    assert engine.models == {RequestKind.CHAT: "echo"}
    assert [s.ran for s in result.stages] == [True, True, True]
    assert result.breaking_point is None and result.engine == "scripted"
    assert result.resources_note == "fixed numbers"
    data = json.loads((tmp_path / "result.json").read_text())
    assert len(data["stages"]) == 3
    assert (tmp_path / "report.html").exists()
    assert lines[0].startswith("scripted against http://127.0.0.1:9/v1: 3 stages, 30 s")
    assert "stage 3/3: 4 users for 10 s" in lines and "stages done" in lines


def test_a_run_stopped_early_reports_the_stages_not_run(tmp_path: Path) -> None:
    result = run_loadtest(
        config(models={"generation": "echo"}),
        tmp_path,
        engine=ScriptedEngine([10, 20, 40], stop_after=2),
        sampler=FixedSampler(),
        write=lambda line: None,
    )
    assert [s.ran for s in result.stages] == [True, True, False]
    assert result.stopped == "hard deadline (--max-duration) reached"
    assert "the run was stopped early" in " ".join(result.notes)
    assert "not run" in (tmp_path / "report.html").read_text()


def test_models_found_from_the_listing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    listing = [{"id": "echo", "task": "text-generation"}, {"id": "big", "task": "text-generation"}]
    monkeypatch.setattr(run_module, "fetch_models", lambda config: listing)
    engine = ScriptedEngine([10, 20, 40])
    result = run_loadtest(
        config(), tmp_path, engine=engine, sampler=FixedSampler(), write=lambda line: None
    )
    assert engine.models == {RequestKind.CHAT: "echo"}
    assert result.notes == ["generation model echo (first of echo, big; choose with --model)"]


def test_no_listing_asks_for_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def refuse(config: LoadTestConfig) -> list[dict[str, Any]]:
        raise httpx.ConnectError("connection refused")

    monkeypatch.setattr(run_module, "fetch_models", refuse)
    with pytest.raises(ModelSelectionError, match="pass --model and --embedding-model"):
        run_loadtest(config(), tmp_path, engine=ScriptedEngine([1]), sampler=FixedSampler())
