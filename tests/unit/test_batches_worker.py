"""app.batches.worker, driver and settings without Ray: settings fail on bad values by name;
the lazy KV client connects once and answers 503 until it can; the driver's sweep finds runs
never claimed or left by a dead worker and leaves live ones alone; and a BatchWorker over a
fake KV store and a fake gateway takes a batch from start_batch to its output file, nudged
or found by its sweep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from app.api.errors import ServiceUnavailableError
from app.batches.batches import BatchCreateRequest
from app.batches.driver import RunDriver
from app.batches.sender import GatewaySender
from app.batches.settings import BatchSettings
from app.batches.worker import BatchWorker, LazyKV, batch_services, worker_nudger
from app.workflows.engine import RetryPolicy, RunStatus, Step, Workflow, WorkflowEngine
from tests.unit.kv_fakes import FakeClock, FakeKV

CHAT = "/v1/chat/completions"


# Settings -----------------------------------------------------------------------------------
def test_settings_defaults_and_queue_options() -> None:
    s = BatchSettings()
    assert s.queue_options() == {
        "visibility_s": 60.0,
        "max_attempts": 5,
        "backoff_s": 1.0,
        "max_backoff_s": 60.0,
    }
    assert s.concurrency.ceiling >= s.concurrency.initial


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"line_attempts": 0}, "line_attempts"),
        ({"concurrency": {"ceiling": 0}}, "concurrency.ceiling"),
        ({"max_runs": 0}, "max_runs"),
        ({"surprise": 1}, "surprise"),
        ({"claim_grace_s": 30, "lease_s": 30}, "claim_grace_s"),
        ({"line_backoff_s": 10, "line_max_backoff_s": 1}, "line_max_backoff_s"),
    ],
)
def test_bad_settings_fail_naming_the_field(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(ValidationError) as raised:
        BatchSettings.model_validate(fields)
    assert named in str(raised.value)


def test_the_file_store_is_the_configured_one(tmp_path: Path) -> None:
    store = BatchSettings(files_url=str(tmp_path / "files")).content_store()
    with store.open_write("file-1") as handle:
        handle.write(b"x")
    assert (tmp_path / "files" / "file-1").read_bytes() == b"x"


# LazyKV -------------------------------------------------------------------------------------
def test_lazy_kv_connects_once_and_is_a_503_until_it_can() -> None:
    kv = FakeKV()
    tries: list[int] = []

    def connect() -> FakeKV:
        tries.append(1)
        if len(tries) == 1:
            raise ConnectionError("no KV cluster named 'kv'")
        return kv

    lazy = LazyKV(connect)
    with pytest.raises(ServiceUnavailableError):
        lazy.get("k")
    assert lazy.put("k", 1) > 0
    assert lazy.get("k") == 1 and lazy.mget(["k", "x"]) == [1, None]
    assert lazy.cas("k", None, 2) == (False, lazy.get_versioned("k")[1])  # type: ignore[index]
    assert lazy.delete("k") and len(tries) == 2


# RunDriver ----------------------------------------------------------------------------------
class Steps:
    def __init__(self) -> None:
        self.ran: list[str] = []

    def one(self, ctx: Any) -> dict[str, Any]:
        self.ran.append(ctx.run_id)
        return {"ok": True}


def driver_world(grace_s: float = 0.0) -> tuple[FakeKV, WorkflowEngine, RunDriver, Steps]:
    kv, steps = FakeKV(), Steps()
    flow = Workflow("w", (Step("one", steps.one, None, RetryPolicy(max_attempts=1), 5.0),))
    engine = WorkflowEngine(kv, {"w": flow}, owner="me", lease_s=30.0)
    return kv, engine, RunDriver(engine, kv, max_runs=4, grace_s=grace_s), steps


def test_the_sweep_drives_runs_nobody_claimed() -> None:
    _, engine, driver, steps = driver_world()
    engine.start("w", {}, run_id="r1")
    engine.start("w", {}, run_id="r2")
    assert sorted(driver.sweep()) == ["r1", "r2"]
    assert driver.join(5)
    assert sorted(steps.ran) == ["r1", "r2"]
    assert engine.status("r1").status == RunStatus.SUCCEEDED  # type: ignore[union-attr]
    assert driver.claimable() == [] and driver.driving() == []


def test_a_new_run_is_left_to_its_nudged_worker_for_the_grace() -> None:
    _, engine, driver, _ = driver_world(grace_s=10.0)
    engine.start("w", {}, run_id="r1")
    assert driver.claimable() == []
    engine.clock = lambda: time.time() + 11
    assert driver.claimable() == ["r1"]


def test_a_live_lease_is_left_alone_and_a_lapsed_one_taken() -> None:
    kv, engine, driver, _ = driver_world()
    engine.start("w", {}, run_id="r1")
    record = kv.value(engine.run_key("r1"))
    held = record | {"owner": "other", "token": "t", "lease_until": time.time() + 30}
    kv.put(engine.run_key("r1"), held)
    assert driver.claimable() == []
    kv.put(engine.run_key("r1"), held | {"lease_until": time.time() - 1})
    assert driver.claimable() == ["r1"]


def test_drive_is_once_per_run_and_bounded() -> None:
    _, engine, driver, _ = driver_world()

    def slow(run_id: str) -> Any:  # runs stay in flight for a moment
        time.sleep(0.3)

    engine.run = slow  # type: ignore[method-assign]
    assert driver.drive("a") and not driver.drive("a")
    assert all(driver.drive(r) for r in "bcd") and not driver.drive("e")  # max_runs=4
    assert driver.join(5) and driver.drive("e")


# batch_services and the worker ---------------------------------------------------------------
class Method:
    def __init__(self, name: str) -> None:
        self.name = name

    def remote(self, req: Any, priority: str | None = None) -> Awaitable[dict[str, Any]]:
        async def answer() -> dict[str, Any]:
            text = req.messages[0].content
            return {"object": "chat.completion", "echo": text}

        return answer()


class FakeGateway:
    chat = Method("chat")


class Worker(BatchWorker):
    """The real worker over a shared fake KV store and a fake gateway handle."""

    kv_store: FakeKV

    def connector(self) -> Any:
        return lambda: self.kv_store

    def sender(self) -> GatewaySender:
        return GatewaySender(lambda: FakeGateway())


def settings(tmp_path: Path) -> BatchSettings:
    return BatchSettings(
        files_url=str(tmp_path / "files"),
        poll_s=0.02,
        idle_s=0.01,
        flush_s=0.01,
        sweep_s=0.05,
        claim_grace_s=0.2,
        nice=0,  # the worker runs in the test's own process
    )


def make_worker(kv: FakeKV, s: BatchSettings) -> Worker:
    Worker.kv_store = kv
    return Worker(["echo"], s.model_dump())


def upload(files: Any, owner: str, texts: list[str]) -> str:
    lines = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": CHAT,
            "body": {"model": "echo", "messages": [{"role": "user", "content": t}]},
        }
        for i, t in enumerate(texts)
    ]
    up = files.begin(owner, "in.jsonl")
    up.write(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    return str(up.commit("batch")["id"])


async def run_batch(services: tuple[Any, Any, Any], texts: list[str]) -> dict[str, Any]:
    files, batches, start_batch = services
    file_id = await asyncio.to_thread(upload, files, "k1", texts)
    req = BatchCreateRequest(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    batch = await asyncio.to_thread(batches.create, "k1", req)
    await start_batch(batch["id"])
    for _ in range(500):
        got: dict[str, Any] = await asyncio.to_thread(batches.get, "k1", batch["id"])
        if got["status"] in ("completed", "failed", "expired", "cancelled"):
            return got
        await asyncio.sleep(0.02)
    raise AssertionError(f"batch stuck: {got}")


def outputs(files: Any, file_id: str) -> list[tuple[str, str]]:
    data = b"".join(files.content_chunks("k1", file_id))
    records = [orjson.loads(x) for x in data.splitlines()]
    return [(r["custom_id"], r["response"]["body"]["echo"]) for r in records]


async def test_a_nudged_worker_runs_a_batch_to_its_output(tmp_path: Path) -> None:
    kv, s = FakeKV(FakeClock()), settings(tmp_path)
    worker = make_worker(kv, s)
    nudged: list[str] = []

    async def nudge(batch_id: str) -> None:
        nudged.append(batch_id)
        await worker.nudge(batch_id)

    services = batch_services(lambda: kv, s, nudge=nudge)
    try:
        batch = await run_batch(services, ["one", "two", "three"])
        assert batch["status"] == "completed", batch
        assert nudged == [batch["id"]]
        assert batch["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
        assert outputs(services[0], batch["output_file_id"]) == [
            ("c0", "one"),
            ("c1", "two"),
            ("c2", "three"),
        ]
        stats = await worker.stats()
        assert stats["connected"] and stats["last_error"] is None
    finally:
        await worker.shutdown(drain_s=1)


async def test_without_a_nudge_the_sweep_finds_the_batch(tmp_path: Path) -> None:
    kv, s = FakeKV(FakeClock()), settings(tmp_path)

    async def lost(batch_id: str) -> None:  # the worker app was not deployed
        return None

    services = batch_services(lambda: kv, s, nudge=lost)
    worker = make_worker(kv, s)
    try:
        batch = await run_batch(services, ["a"])
        assert batch["status"] == "completed", batch
    finally:
        await worker.shutdown(drain_s=1)


async def test_a_missing_worker_app_is_only_logged() -> None:
    await worker_nudger("no-such-app")("batch_1")  # no Serve here: nothing raised


async def test_the_worker_waits_for_the_kv_store(tmp_path: Path) -> None:
    class Unreachable(Worker):
        def connector(self) -> Any:
            def fail() -> Any:
                raise ConnectionError("no KV cluster")

            return fail

    worker = Unreachable(["echo"], settings(tmp_path).model_dump())
    try:
        await asyncio.sleep(0.1)
        stats = await worker.stats()
        assert not stats["connected"] and "no KV cluster" in stats["last_error"]
        await worker.check_health()  # not a reason to restart the replica
    finally:
        await worker.shutdown(drain_s=1)


async def test_serve_awaits_the_destructor_and_the_collector_gets_nothing(tmp_path: Path) -> None:
    worker = make_worker(FakeKV(FakeClock()), settings(tmp_path))
    await asyncio.sleep(0.05)
    closing = worker.__del__()
    assert closing is not None
    await asyncio.wait_for(closing, 5)
    assert all(task.done() for task in worker._tasks)
    assert worker.__del__() is None
