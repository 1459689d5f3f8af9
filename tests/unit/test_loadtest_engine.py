"""The engine's process handling: the hard deadline kills the whole process group, the API key
travels in the environment only, and no LOCUST_* variable reaches Locust."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from app.loadtest.config import LoadTestConfig, RequestKind, build_config
from app.loadtest.engine import API_KEY_ENV, PLAN_ENV, LocustEngine


def config(**fields: object) -> LoadTestConfig:
    return build_config(
        {"base_url": "http://127.0.0.1:9", "stages": [{"duration_s": 1, "users": 1}], **fields}
    )


class SleepyEngine(LocustEngine):
    """Runs a stand-in that starts a child and never finishes, instead of Locust."""

    def __init__(self, pid_file: Path) -> None:
        super().__init__(poll_s=0.05)
        self.pid_file = pid_file

    def command(self, config: LoadTestConfig) -> list[str]:
        script = (
            "import subprocess, sys, time;"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            f"open({str(self.pid_file)!r}, 'w').write(str(child.pid));"
            "time.sleep(60)"
        )
        return [sys.executable, "-c", script]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_the_hard_deadline_kills_the_engine_and_its_children(tmp_path: Path) -> None:
    engine = SleepyEngine(tmp_path / "child.pid")
    polls: list[float] = []
    began = time.monotonic()
    run = engine.run(
        config(max_duration_s=1.5),
        {RequestKind.CHAT: "m"},
        tmp_path,
        on_poll=lambda: polls.append(1),
    )
    assert run.stopped == "hard deadline (--max-duration) reached"
    assert 1.5 <= time.monotonic() - began < 10
    assert run.exit_code is not None and polls
    child = int((tmp_path / "child.pid").read_text())
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)


def test_environment_and_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LOCUST_HOST", "http://elsewhere:1")
    monkeypatch.setenv(API_KEY_ENV, "stale")
    engine = LocustEngine()
    with_key = config(api_key="sk-test")
    env = engine.environment(with_key, tmp_path / "plan.json")
    assert "LOCUST_HOST" not in env
    assert env[API_KEY_ENV] == "sk-test" and env[PLAN_ENV] == str(tmp_path / "plan.json")
    assert API_KEY_ENV not in engine.environment(config(), tmp_path / "plan.json")
    command = engine.command(with_key)
    assert "sk-test" not in " ".join(command)
    assert command[command.index("--host") + 1] == "http://127.0.0.1:9/v1"
    assert "--headless" in command


def test_plan_file_has_no_key(tmp_path: Path) -> None:
    engine = SleepyEngine(tmp_path / "child.pid")
    engine.run(config(api_key="sk-test", max_duration_s=1), {RequestKind.CHAT: "m"}, tmp_path)
    plan = (tmp_path / "plan.json").read_text()
    assert "sk-test" not in plan and '"chat": "m"' in plan
