"""A load test's result, the one structure the JSON file, the HTML report and the CLI share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from app.loadtest.analysis import (
    BreakingPoint,
    Scalability,
    StageStats,
    analyse_stages,
    breaking_point,
    scalability,
)
from app.loadtest.config import LoadTestConfig, RequestKind
from app.loadtest.recommendations import Findings, recommend
from app.loadtest.records import RequestRecord, StageMark
from app.loadtest.resources import ResourceSample

SCHEMA_VERSION = 1


class LoadTestResult(BaseModel):
    schema_version: int = SCHEMA_VERSION
    base_url: str
    started_at: float
    finished_at: float
    load_unit: str
    engine: str
    stopped: str | None
    models: dict[str, str]
    notes: list[str]
    resources_source: str
    resources_note: str
    config: dict[str, Any]
    stages: list[StageStats]
    scalability: Scalability
    breaking_point: BreakingPoint | None
    recommendations: list[str]
    resource_samples: list[dict[str, Any]]


def summarise(
    config: LoadTestConfig,
    models: dict[RequestKind, str],
    records: Sequence[RequestRecord],
    marks: Sequence[StageMark],
    samples: Sequence[ResourceSample],
    *,
    started_at: float,
    finished_at: float,
    engine: str,
    stopped: str | None = None,
    resources: tuple[str, str] = ("local", ""),
    notes: Sequence[str] = (),
) -> LoadTestResult:
    """Everything the report shows, from the raw records of one run. `resources` is the
    sampler's (source, note)."""
    stages = analyse_stages(config, records, marks, samples, run_end=finished_at)
    scaling = scalability(stages, config.load_unit)
    breaking = breaking_point(stages)
    findings = Findings(stages, breaking, scaling, config.thresholds, resources[0])
    all_notes = list(notes)
    if stopped:
        all_notes.append(f"the run was stopped early: {stopped}")
    return LoadTestResult(
        base_url=config.base_url,
        started_at=started_at,
        finished_at=finished_at,
        load_unit=config.load_unit,
        engine=engine,
        stopped=stopped,
        models={kind.value: model for kind, model in models.items()},
        notes=all_notes,
        resources_source=resources[0],
        resources_note=resources[1],
        config=config.model_dump(mode="json"),
        stages=stages,
        scalability=scaling,
        breaking_point=breaking,
        recommendations=recommend(findings),
        resource_samples=[_sample(s) for s in samples],
    )


def _sample(sample: ResourceSample) -> dict[str, Any]:
    return {
        "at": sample.at,
        "cpu_percent": sample.cpu_percent,
        "memory_percent": sample.memory_percent,
        "gpu_percent": sample.gpu_percent,
        "gpus": sample.gpus,
        "nodes": sample.nodes,
    }
