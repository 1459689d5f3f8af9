"""Live progress: a line per stage change and per window, with a fake clock."""

from __future__ import annotations

from pathlib import Path

from app.loadtest.config import RequestKind, build_config
from app.loadtest.progress import Progress, window_line
from app.loadtest.records import END, OK, RecordReader, RequestRecord, StageMark
from app.loadtest.resources import ResourceSample


def test_window_line() -> None:
    records = [RequestRecord(RequestKind.CHAT, 0, 100.0, OK)] * 10 + [
        RequestRecord(RequestKind.CHAT, 0, 1.0, "503")
    ] * 2
    sample = ResourceSample(0, cpu_percent=55.4, memory_used_bytes=1, memory_total_bytes=4)
    assert window_line(records, 5.0, sample) == (
        "2.0 req/s ok | p95 100 ms | errors 2 (503: 2) | CPU 55% mem 25% GPU -"
    )
    assert window_line([], 5.0, None) == "0.0 req/s ok | p95 - | errors 0"


def test_progress_prints_stage_changes_and_windows(tmp_path: Path) -> None:
    config = build_config(
        {"base_url": "http://127.0.0.1:1", "stages": [{"duration_s": 10, "users": 2}]}
    )
    path = tmp_path / "records.jsonl"
    now = [0.0]
    lines: list[str] = []
    progress = Progress(
        config, RecordReader(path), every_s=5, write=lines.append, get_curr_time_s=lambda: now[0]
    )
    now[0] = 30.0
    progress()  # the engine is still starting: no window yet
    assert lines == []
    path.write_text(
        StageMark(0, 1.0).to_json()
        + "\n"
        + RequestRecord(RequestKind.CHAT, 1, 10.0, OK).to_json()
        + "\n"
    )
    progress()
    now[0] = 35.0
    progress()
    with path.open("a") as handle:
        handle.write(StageMark(END, 11.0).to_json() + "\n")
    progress()
    assert lines == [
        "stage 1/1: 2 users for 10 s",
        "0.2 req/s ok | p95 10 ms | errors 0",
        "stages done",
    ]
