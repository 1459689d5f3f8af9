"""Records and stage marks: their lines, and a reader that follows a growing file."""

from __future__ import annotations

from pathlib import Path

from app.loadtest.config import RequestKind
from app.loadtest.records import END, OK, RecordReader, RequestRecord, StageMark, parse_line


def test_round_trip() -> None:
    record = RequestRecord(RequestKind.STREAM, 12.5, 250.0, OK, 20.0, [1.5, 2.5], 3)
    assert parse_line(record.to_json()) == record
    plain = RequestRecord(RequestKind.CHAT, 1.0, 5.0, "503")
    assert "itl_ms" not in plain.to_json() and parse_line(plain.to_json()) == plain
    assert parse_line(StageMark(END, 9.0).to_json()) == StageMark(END, 9.0)
    assert plain.end == 1.005 and not plain.ok


def test_reader_takes_complete_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    reader = RecordReader(path)
    assert reader.read_new() == []  # not written yet
    first = RequestRecord(RequestKind.CHAT, 1.0, 5.0, OK)
    second = RequestRecord(RequestKind.EMBEDDING, 2.0, 6.0, OK)
    half = second.to_json()
    path.write_text(StageMark(0, 0.5).to_json() + "\n" + first.to_json() + "\n" + half[:10])
    assert reader.read_new() == [first]
    assert reader.marks == [StageMark(0, 0.5)]
    with path.open("a") as handle:
        handle.write(half[10:] + "\nnot json\n")
    assert reader.read_new() == [second]
    assert reader.records == [first, second]
