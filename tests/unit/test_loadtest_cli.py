"""`app loadtest` flags: wired into `app`, turned into a config, errors reported with exit 2."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from app.cli import build_parser
from app.loadtest.cli import cmd_loadtest, config_from_args


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["loadtest", *argv])


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = config_from_args(parse())
    assert config.base_url == "http://127.0.0.1:8000/v1"
    assert [s.users for s in config.stages] == [1, 2, 4, 8, 16]
    assert {s.duration_s for s in config.stages} == {30}
    assert config.api_key is None


def test_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    args = parse(
        "http://10.0.0.5:8000",
        "--allow-host", "10.0.0.5",
        "--rps", "2,4",
        "--stage-duration", "5",
        "--mix", "chat=1,stream=1",
        "--prompt-tokens", "uniform:8:16",
        "--output-tokens", "16",
        "--model", "echo",
        "--p95-ms", "750",
        "--max-duration", "60",
        "--metrics-url", "http://10.0.0.5:8080/metrics",
    )  # fmt: skip
    config = config_from_args(args)
    assert [s.rps for s in config.stages] == [2, 4] and config.load_unit == "rps"
    assert config.mix.kinds()[0].value == "chat" and config.mix.embedding == 0
    assert config.models.generation == "echo" and config.models.embedding is None
    assert config.thresholds.p95_ms == 750 and config.thresholds.error_rate == 0.01
    assert config.max_duration_s == 60 and config.deadline_s == 60
    assert config.api_key is not None and config.api_key.get_secret_value() == "sk-env"
    assert config.metrics_urls == ["http://10.0.0.5:8080/metrics"]


def test_config_file_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "load.yaml"
    path.write_text(
        "base_url: http://127.0.0.1:9000\n"
        "stages: [{duration_s: 5, users: 1}, {duration_s: 5, users: 3}]\n"
        "thresholds: {error_rate: 0.2}\n"
    )
    config = config_from_args(parse("--config", str(path), "--p95-ms", "300"))
    assert [s.users for s in config.stages] == [1, 3]
    assert (config.thresholds.p95_ms, config.thresholds.error_rate) == (300, 0.2)
    assert config.base_url == "http://127.0.0.1:9000/v1"  # the file's: no URL was given
    other = config_from_args(parse("http://localhost:7000", "--config", str(path)))
    assert other.base_url == "http://localhost:7000/v1"


def test_refusals_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cmd_loadtest(parse("http://192.0.2.10:8000")) == 2
    assert "--allow-host 192.0.2.10" in capsys.readouterr().err
    assert cmd_loadtest(parse("--users", "1,x")) == 2
    assert "not a number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("--users", "1", "--rps", "2")
