"""The load engine: Locust, headless, in its own process, killed at the run's hard deadline.

Why Locust: it drives more load per core than the alternatives on this 2-core machine.
`python -m app.loadtest.calibrate` (32 users, 8 s each, 4-token chat requests against the
stub, sharing the cores with a Ray CI run) measured this engine, records file included, at
1,628 requests/s, an asyncio loop on aiohttp at 902 and one on httpx at 86 (424 / 314 / 22
with the machine at load 14); a bare Locust file reached 2,870-3,500 against aiohttp's
2,350-2,750 and httpx's 180-390. httpx's connection pool dominates at this concurrency.
Locust also brings the stage shape and per-user pacing, and its gevent monkey-patching stays
out of the `app` process because it runs in a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from app.loadtest.config import LoadTestConfig, RequestKind

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
PLAN_ENV = "APP_LOADTEST_PLAN"
API_KEY_ENV = "APP_LOADTEST_API_KEY"
KILL_GRACE_S = 5.0


@dataclass(frozen=True)
class EngineRun:
    """How the engine ended: `stopped` is None when it finished its stages, else why it was
    stopped (the hard deadline, an interrupt)."""

    exit_code: int | None
    stopped: str | None
    records: Path
    log: Path
    elapsed_s: float


class LoadEngine(ABC):
    """Drives a config's stages against its base URL, writing the records file as it goes
    and calling `on_poll` every fraction of a second until done."""

    name: str = "engine"

    @abstractmethod
    def run(
        self,
        config: LoadTestConfig,
        models: dict[RequestKind, str],
        out_dir: Path,
        on_poll: Callable[[], None] = lambda: None,
    ) -> EngineRun:
        """Run every stage, or stop at the config's hard deadline."""


class LocustEngine(LoadEngine):
    """Locust in a subprocess, stopped by SIGTERM then SIGKILL at the deadline."""

    def __init__(
        self,
        python: str = sys.executable,
        get_curr_time_s: Callable[[], float] = time.monotonic,
        poll_s: float = 0.5,
    ) -> None:
        self.python = python
        self.name = f"locust {_version('locust')}"
        self.get_curr_time_s = get_curr_time_s
        self.poll_s = poll_s

    def run(
        self,
        config: LoadTestConfig,
        models: dict[RequestKind, str],
        out_dir: Path,
        on_poll: Callable[[], None] = lambda: None,
    ) -> EngineRun:
        records, log = out_dir / "records.jsonl", out_dir / "locust.log"
        records.write_text("")
        plan = out_dir / "plan.json"
        plan.write_text(
            json.dumps(
                {
                    "config": config.model_dump(mode="json"),
                    "models": {kind.value: model for kind, model in models.items()},
                    "records": str(records),
                },
                indent=2,
            )
        )
        started = self.get_curr_time_s()
        deadline = started + config.deadline_s
        with log.open("w") as log_file:
            process = subprocess.Popen(
                self.command(config),
                cwd=out_dir,  # Locust reads ./locust.conf and ./pyproject.toml: not the project's
                env=self.environment(config, plan),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            stopped = self._watch(process, deadline, on_poll)
        return EngineRun(
            process.returncode, stopped, records, log, self.get_curr_time_s() - started
        )

    def command(self, config: LoadTestConfig) -> list[str]:
        return [
            self.python,
            "-m",
            "locust",
            "-f",
            str(LOCUSTFILE),
            "--headless",
            "--only-summary",
            "--host",  # on the command line, so no locust.conf or LOCUST_HOST can move the load
            config.base_url,
            "--loglevel",
            "WARNING",
            "--exit-code-on-error",
            "0",
        ]

    def environment(self, config: LoadTestConfig, plan: Path) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("LOCUST_")}
        env[PLAN_ENV] = str(plan)
        env.pop(API_KEY_ENV, None)
        if config.api_key is not None:
            env[API_KEY_ENV] = config.api_key.get_secret_value()  # not argv: ps shows argv
        return env

    def _watch(
        self, process: subprocess.Popen[bytes], deadline: float, on_poll: Callable[[], None]
    ) -> str | None:
        try:
            while process.poll() is None:
                if self.get_curr_time_s() >= deadline:
                    _kill(process)
                    return "hard deadline (--max-duration) reached"
                on_poll()
                time.sleep(self.poll_s)
        except KeyboardInterrupt:
            _kill(process)
            return "interrupted"
        on_poll()
        return None


def _kill(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the engine's process group, SIGKILL if it is still there after a grace."""
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "(not installed)"
