"""`app loadtest` against the real service: short stages on a deliberately tiny deployment (an echo
model with one slot and a queue of one) write the report with every stage and find the stage
where it breaks (refusals for load past the error-rate threshold)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.catalog.cards import ModelCard, load_catalogue
from tests.integration.conftest import ROOT

MODEL = "tiny-echo"


@pytest.fixture(scope="module")
def tiny(serving: str) -> Iterator[str]:
    """The tiny model's own base URL."""
    from ray import serve

    from app.serving.builder import model_application
    from app.serving.deploy import wait_running

    catalogue = load_catalogue(ROOT / "models")
    base = catalogue.get("echo")
    assert base is not None
    card = ModelCard.model_validate(
        base.model_dump(mode="json")
        | {
            "id": MODEL,
            "replicas": {"min": 1, "max": 1},
            "max_ongoing_requests": 1,
            "max_queued_requests": 1,
            # Each answer takes a while, so that a handful of users fill the one slot.
            "generation": {"max_tokens": 256, "max_context_tokens": 8192},
        }
    )
    serve.run(
        model_application(card, catalogue.directory),
        name=card.deployment_name,
        route_prefix=f"/models/{MODEL}",
        blocking=False,
    )
    try:
        wait_running([card.deployment_name], timeout_s=300)
        yield f"{serving}/models/{MODEL}/v1"
    finally:
        serve.delete(card.deployment_name)


@pytest.mark.timeout(300)
def test_a_staged_run_finds_the_breaking_point_of_a_tiny_deployment(
    tiny: str, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    run = subprocess.run(
        [
            sys.executable, "-m", "app", "loadtest", tiny,
            "--users", "1,16",
            "--stage-duration", "6",
            "--mix", "chat=1,stream=1",
            "--model", MODEL,
            "--output-tokens", "fixed:64",
            "--p95-ms", "60000",
            "--max-error-rate", "0.05",
            "--out", str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=os.environ | {"OPENAI_API_KEY": ""},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    stages = result["stages"]
    assert [stage["users"] for stage in stages] == [1, 16]
    assert all(stage["requests"] > 0 for stage in stages)
    # One user never finds the slot taken; sixteen are refused with 429 past the threshold.
    assert stages[0]["error_rate"] <= 0.05
    assert result["breaking_point"]["stage"] == stages[1]["index"], result["breaking_point"]
    assert "429" in json.dumps(stages[1]["errors"])
    html = (out / "report.html").read_text()
    assert "<svg" in html and "breaking point" in html.lower()
