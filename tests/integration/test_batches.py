"""OpenAI's Files and Batch APIs on real Ray Serve, driven by the official openai client against
the gateway's base URL: upload a JSONL file, create a batch, poll it, download results that match
the synchronous API's answers; a bad line reported in the error file; cancel mid-run; a batch
worker killed mid-batch losing and duplicating no line; and the job's events on the bus.

The session's gateway and batch worker (build_all deploys both) over the region's KV store,
started here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import ray

from tests.integration.support import wait_until

TERMINAL = {"completed", "failed", "expired", "cancelled"}


@pytest.fixture(scope="module")
def client(serving: str) -> Iterator[openai.OpenAI]:
    from app.kv import KVConfig, shutdown_kv, start_kv

    start_kv(KVConfig())
    try:
        yield openai.OpenAI(base_url=f"{serving}/v1", api_key="unused", max_retries=0)
    finally:
        shutdown_kv()


def line(custom_id: str, content: str, model: str = "echo", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": content}]} | body,
    }


def upload(client: openai.OpenAI, tmp_path: Path, lines: list[Any]) -> str:
    path = tmp_path / "input.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    with path.open("rb") as handle:
        uploaded = client.files.create(file=handle, purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == path.stat().st_size
    return uploaded.id


def finished(client: openai.OpenAI, batch_id: str, timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in TERMINAL:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch}"
        time.sleep(0.5)


def jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    text = client.files.content(file_id).text
    return [json.loads(row) for row in text.splitlines() if row.strip()]


def test_a_batch_runs_to_completion_with_the_synchronous_answers(
    client: openai.OpenAI, tmp_path: Path
) -> None:
    prompts = {f"q{i}": f"batch question number {i}" for i in range(5)}
    lines: list[Any] = [line(cid, text, temperature=0) for cid, text in prompts.items()]
    lines.append('{"custom_id": "broken", "method": "POST"')  # not JSON: the error file
    lines.append(line("wrong-model", "x", model="no-such-model"))
    file_id = upload(client, tmp_path, lines)
    batch = client.batches.create(
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"suite": "integration"},
    )
    assert batch.status in {"validating", "in_progress"} and batch.metadata == {
        "suite": "integration"
    }
    done = finished(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (5, 2)
    output = {row["custom_id"]: row for row in jsonl(client, done.output_file_id)}
    assert set(output) == set(prompts)
    for cid, text in prompts.items():
        sync = client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": text}], temperature=0
        )
        response = output[cid]["response"]
        assert response["status_code"] == 200 and output[cid]["error"] is None
        assert response["body"]["choices"][0]["message"]["content"] == (
            sync.choices[0].message.content
        )
    errors = {row["custom_id"]: row for row in jsonl(client, done.error_file_id)}
    assert "wrong-model" in errors
    assert any(
        cid in (None, "broken") or "broken" in json.dumps(row) for cid, row in errors.items()
    )
    listed = client.batches.list(limit=100)
    assert batch.id in {b.id for b in listed.data}


def test_a_batch_cancelled_mid_run_ends_cancelled(client: openai.OpenAI, tmp_path: Path) -> None:
    lines = [
        line(f"c{i}", f"a long story {i}", model="tiny-llama", max_tokens=64) for i in range(60)
    ]
    batch = client.batches.create(
        input_file_id=upload(client, tmp_path, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    wait_until(
        lambda: client.batches.retrieve(batch.id).status == "in_progress",
        timeout=60,
        what="the batch to start",
    )
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in {"cancelling", "cancelled"}
    done = finished(client, batch.id)
    assert done.status == "cancelled", done
    assert done.request_counts is not None
    assert done.request_counts.completed < 60


def test_a_worker_killed_mid_batch_loses_and_duplicates_no_line(
    client: openai.OpenAI, tmp_path: Path
) -> None:
    from ray import serve

    from app.batches.settings import BATCH_WORKER_APP

    count = 40
    lines = [
        line(f"k{i}", f"kill test {i}", model="tiny-llama", max_tokens=24) for i in range(count)
    ]
    batch = client.batches.create(
        input_file_id=upload(client, tmp_path, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )

    def started() -> bool:
        counts = client.batches.retrieve(batch.id).request_counts
        return counts is not None and counts.completed > 0

    wait_until(started, timeout=90, what="the first lines to finish")
    replicas = [
        actor
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if f"SERVE_REPLICA::{BATCH_WORKER_APP}#" in actor["name"]
    ]
    assert replicas, "no batch worker replica"
    for actor in replicas:
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    done = finished(client, batch.id, timeout=300)
    assert done.status == "completed", done
    ids = [row["custom_id"] for row in jsonl(client, done.output_file_id)]
    assert sorted(ids) == sorted(f"k{i}" for i in range(count))  # each line once
    assert serve.status().applications[BATCH_WORKER_APP].status == "RUNNING"


def test_the_jobs_lifecycle_is_on_the_event_stream(serving: str, client: openai.OpenAI) -> None:
    with httpx.stream(
        "GET", f"{serving}/v1/events", params={"after": 0, "timeout_s": 5}, timeout=30
    ) as response:
        assert response.status_code == 200
        events = [
            json.loads(row.removeprefix("data: "))
            for row in response.iter_lines()
            if row.startswith("data: ")
        ]
    types = {event["type"] for event in events}
    assert {"job.started", "job.completed", "job.cancelled"} <= types, types
