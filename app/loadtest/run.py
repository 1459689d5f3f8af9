"""One load test from config to report: models, resource sampling, the engine, the analysis."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx

from app.loadtest.config import LoadTestConfig
from app.loadtest.engine import LoadEngine, LocustEngine
from app.loadtest.models import ModelSelectionError, fetch_models, select_models
from app.loadtest.progress import Progress
from app.loadtest.records import RecordReader
from app.loadtest.report import write_report
from app.loadtest.resources import ResourceMonitor, ResourceSampler, choose_sampler
from app.loadtest.result import LoadTestResult, summarise


def run_loadtest(
    config: LoadTestConfig,
    out_dir: Path,
    *,
    engine: LoadEngine | None = None,
    sampler: ResourceSampler | None = None,
    progress_every_s: float = 5.0,
    write: Callable[[str], None] | None = None,
) -> LoadTestResult:
    """Run the stages and write result.json and report.html (also after a stop at the hard
    deadline or an interrupt: the stages that ran are reported, the others marked not run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    kinds = config.mix.kinds()
    listing = []
    if any(config.models.for_kind(kind) is None for kind in kinds):
        try:
            listing = fetch_models(config)
        except (httpx.HTTPError, ValueError) as exc:
            raise ModelSelectionError(
                f"could not list the models at {config.base_url}/models ({exc}); "
                "pass --model and --embedding-model"
            ) from exc
    models, notes = select_models(config.models, listing, kinds)
    sampler = sampler or choose_sampler(config.metrics_urls)
    engine = engine or LocustEngine()
    reader = RecordReader(out_dir / "records.jsonl")
    started = time.time()
    with ResourceMonitor(sampler, config.sample_interval_s) as monitor:
        progress = Progress(config, reader, lambda: monitor.latest, progress_every_s, write)
        progress.write(
            f"{engine.name} against {config.base_url}: {len(config.stages)} stages, "
            f"{config.stages_total_s:g} s, stopped at {config.deadline_s:g} s at the latest; "
            f"models {', '.join(sorted(set(models.values())))}; resources: {sampler.note}"
        )
        for note in notes:
            progress.write(note)
        run = engine.run(config, models, out_dir, on_poll=progress)
    reader.read_new()
    if run.exit_code not in (0, None) and not reader.records:
        notes.append(f"the engine exited with {run.exit_code}: see {run.log}")
    result = summarise(
        config,
        models,
        reader.records,
        reader.marks,
        monitor.samples,
        started_at=started,
        finished_at=time.time(),
        engine=engine.name,
        stopped=run.stopped,
        resources=(sampler.source, sampler.note),
        notes=notes,
    )
    write_report(result, out_dir)
    return result
