"""Staged load tests against an OpenAI-compatible base URL (`app loadtest`)."""

from app.loadtest.config import (
    LoadTestConfig,
    LoadTestConfigError,
    Stage,
    build_config,
    load_config,
)
from app.loadtest.result import LoadTestResult
from app.loadtest.run import run_loadtest

__all__ = [
    "LoadTestConfig",
    "LoadTestConfigError",
    "LoadTestResult",
    "Stage",
    "build_config",
    "load_config",
    "run_loadtest",
]
