"""app.batches.workflow end to end on the real WorkflowEngine and DurableQueue over a fake KV:
a batch completes; a client's cancel ends it cancelled with partial results; an engine cancel
or a failing step compensates in reverse; a batch past its window expires; quota waits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from app.batches.batches import BatchCreateRequest, BatchStatus, BatchStore
from app.batches.capacity import ActiveBatches, BatchQuota
from app.batches.concurrency import AIMDConfig, ModelLimits
from app.batches.content import LocalContent
from app.batches.files import FileStore
from app.batches.output import ResultStore
from app.batches.runner import ActiveQueues, LineRunner, batch_queue
from app.batches.workflow import (
    WORKFLOW,
    BatchDeps,
    batch_workflow,
    next_poll_s,
    start_input,
)
from app.workflows.engine import RunStatus, WorkflowEngine
from tests.unit.kv_fakes import FakeClock, FakeKV

CHAT = "/v1/chat/completions"


def line(custom_id: str, text: str, model: str = "echo") -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}


class Sender:
    """Echoes the prompt; "bad" is a 400, while `busy` every answer is a 429."""

    def __init__(self) -> None:
        self.busy = False
        self.sent: list[str] = []

    async def send(self, url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        text = body["messages"][0]["content"]
        if self.busy:
            return 429, {"error": {"message": "busy"}}
        self.sent.append(text)
        if text == "bad":
            return 400, {"error": {"message": "bad prompt", "type": "invalid_request_error"}}
        return 200, {"object": "chat.completion", "echo": text}


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def publish(self, type: str, data: dict[str, Any], *, source: str) -> None:
        self.seen.append((str(type), data["status"]))


class World:
    """Stores, a one-line-at-a-time worker, and an engine whose step sleeps run the worker."""

    def __init__(
        self, tmp_path: Path, *, per_owner: int | None = None, max_attempts: int = 5
    ) -> None:
        self.clock = clock = FakeClock()
        self.kv = kv = FakeKV(clock)
        self.files = FileStore(kv, LocalContent(tmp_path), clock=clock)
        self.batches = BatchStore(kv, self.files, clock=clock)
        self.results = ResultStore(kv)
        self.quota = BatchQuota(kv, per_owner=per_owner)
        self.active = ActiveBatches(kv)
        self.sender = Sender()
        self.events = Events()
        self.on_tick: Callable[[], None] = lambda: None
        self.queue_for = lambda b: batch_queue(kv, b, clock=clock, max_attempts=max_attempts)
        queues = ActiveQueues(self.active, self.queue_for)
        limits = ModelLimits(AIMDConfig(initial=1, ceiling=1), clock=clock)
        self.runner = LineRunner(
            self.sender, self.results, queues, owner="w1", limits=limits, clock=clock, flush_s=0
        )
        self.deps = BatchDeps(
            batches=self.batches,
            files=self.files,
            results=self.results,
            quota=self.quota,
            active=self.active,
            queue_for=self.queue_for,
            models=lambda: {"echo"},
            clock=clock,
            sleep=self.tick,
            poll_s=5.0,
            events=self.events,
        )
        self.engine = WorkflowEngine(
            kv, {WORKFLOW: batch_workflow(self.deps)}, owner="e1", clock=clock, sleep=clock.sleep
        )

    def tick(self, seconds: float) -> None:
        self.clock.sleep(seconds)
        asyncio.run(self._work())
        self.on_tick()

    async def _work(self) -> None:
        await self.runner.poll()
        await self.runner.drain()

    def submit(self, lines: list[dict[str, Any]], extra: bytes = b"", owner: str = "k1") -> str:
        up = self.files.begin(owner, "in.jsonl")
        up.write(b"".join(orjson.dumps(x) + b"\n" for x in lines) + extra)
        file_id = up.commit("batch")["id"]
        req = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}
        batch_id = str(self.batches.create(owner, BatchCreateRequest.model_validate(req))["id"])
        self.engine.start(WORKFLOW, start_input(batch_id), run_id=batch_id)
        return batch_id

    def lines_of(self, file_id: str | None) -> list[dict[str, Any]]:
        if file_id is None:
            return []
        data = b"".join(self.files.content_chunks("k1", file_id))
        return [orjson.loads(x) for x in data.splitlines()]

    def assert_released(self, batch_id: str) -> None:
        batch = self.batches.record(batch_id)
        assert batch is not None
        assert self.quota.held() == [] and self.active.ids() == []
        assert self.files.record(batch["input_file_id"])["pins"] == []  # type: ignore[index]
        self.clock.advance(1)  # DurableQueue.drop expires keys with a 1 ms TTL
        assert self.kv.live_keys("jobs:q:") == []  # the queue is gone


def test_a_batch_runs_to_completion(tmp_path: Path) -> None:
    world = World(tmp_path)
    lines = [line("a", "one"), line("b", "two"), line("c", "bad"), line("d", "x", model="nope")]
    batch_id = world.submit([*lines, line("a", "dup")], extra=b"not json\n")
    state = world.engine.run(batch_id)
    assert state.status == RunStatus.SUCCEEDED, state.error
    batch = world.batches.get("k1", batch_id)
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 6, "completed": 2, "failed": 4}
    for stamp in ("in_progress_at", "finalizing_at", "completed_at"):
        assert batch[stamp] is not None
    output = world.lines_of(batch["output_file_id"])
    assert [(r["custom_id"], r["response"]["body"]["echo"]) for r in output] == [
        ("a", "one"),
        ("b", "two"),
    ]
    errors = world.lines_of(batch["error_file_id"])
    assert [(r["custom_id"], r["error"] and r["error"]["code"]) for r in errors] == [
        ("c", None),  # a 400 answer: its response, status and body
        ("d", "model_not_found"),
        ("a", "duplicate_custom_id"),
        (None, "invalid_json_line"),
    ]
    assert errors[0]["response"]["status_code"] == 400
    assert sorted(world.sender.sent) == ["bad", "one", "two"]  # each valid line once
    world.assert_released(batch_id)
    kinds = [kind for kind, _ in world.events.seen]
    assert kinds[0] == "job.started" and kinds[-1] == "job.completed"


def test_a_client_cancel_keeps_finished_lines(tmp_path: Path) -> None:
    world = World(tmp_path)
    batch_id = world.submit([line(c, c) for c in "abcde"])
    world.on_tick = lambda: world.batches.cancel("k1", batch_id)  # after the first line
    state = world.engine.run(batch_id)
    assert state.status == RunStatus.SUCCEEDED, state.error
    batch = world.batches.get("k1", batch_id)
    assert batch["status"] == "cancelled"
    assert batch["cancelling_at"] is not None and batch["cancelled_at"] is not None
    assert [r["custom_id"] for r in world.lines_of(batch["output_file_id"])] == ["a"]
    errors = world.lines_of(batch["error_file_id"])
    assert [r["error"]["code"] for r in errors] == ["batch_cancelled"] * 4
    assert batch["request_counts"] == {"total": 5, "completed": 1, "failed": 4}
    world.assert_released(batch_id)


def test_an_engine_cancel_compensates_in_reverse(tmp_path: Path) -> None:
    world = World(tmp_path)
    batch_id = world.submit([line(c, c) for c in "abc"])
    world.on_tick = lambda: world.engine.cancel(batch_id)
    state = world.engine.run(batch_id)
    assert state.status == RunStatus.CANCELLED
    assert state.compensated == ("enqueue_lines", "reserve", "open")
    batch = world.batches.get("k1", batch_id)
    assert batch["status"] == "cancelled" and batch["output_file_id"] is None
    world.assert_released(batch_id)


def test_a_failing_step_undoes_the_completed_ones(tmp_path: Path) -> None:
    world = World(tmp_path)
    batch_id = world.submit([line("a", "a"), line("b", "bad")])

    advance = world.batches.advance

    def broken(batch_id: str, to: BatchStatus, **fields: Any) -> dict[str, Any]:
        if to == BatchStatus.COMPLETED:  # the release step fails on every attempt
            raise ConnectionError("KV unreachable")
        return advance(batch_id, to, **fields)

    world.batches.advance = broken  # type: ignore[method-assign]
    state = world.engine.run(batch_id)
    assert state.status == RunStatus.FAILED
    assert state.compensated == ("write_output", "enqueue_lines", "reserve", "open")
    batch = world.batches.get("k1", batch_id)
    assert batch["status"] == "failed" and batch["errors"]["data"][0]["code"] == "batch_failed"
    assert batch["output_file_id"] is None and batch["error_file_id"] is None
    assert [f["purpose"] for f in world.files.list("k1")[0]] == ["batch"]  # outputs deleted
    world.clock.advance(1)
    assert world.quota.held() == [] and world.kv.live_keys("jobs:q:") == []


def test_lines_not_done_by_the_deadline_expire(tmp_path: Path) -> None:
    world = World(tmp_path)
    batch_id = world.submit([line(c, c) for c in "abc"])

    def overload_after_first() -> None:
        world.sender.busy = True
        world.clock.advance(3 * 3600)  # 24 h pass in a handful of polls

    world.on_tick = overload_after_first
    state = world.engine.run(batch_id)
    assert state.status == RunStatus.SUCCEEDED, state.error
    batch = world.batches.get("k1", batch_id)
    assert batch["status"] == "expired" and batch["expired_at"] is not None
    assert [r["custom_id"] for r in world.lines_of(batch["output_file_id"])] == ["a"]
    errors = world.lines_of(batch["error_file_id"])
    assert [(r["custom_id"], r["error"]["code"]) for r in errors] == [
        ("b", "batch_expired"),
        ("c", "batch_expired"),
    ]
    world.assert_released(batch_id)


def test_an_empty_input_fails_the_batch(tmp_path: Path) -> None:
    world = World(tmp_path)
    batch_id = world.submit([], extra=b"\n\n")
    assert world.engine.run(batch_id).status == RunStatus.SUCCEEDED
    batch = world.batches.get("k1", batch_id)
    assert batch["status"] == "failed"
    assert batch["errors"]["data"][0]["code"] == "empty_file"
    world.assert_released(batch_id)


def test_quota_holds_a_batch_in_validating_until_a_place_frees(tmp_path: Path) -> None:
    world = World(tmp_path, per_owner=1)
    assert world.quota.reserve("k1", "other")
    batch_id = world.submit([line("a", "a")])
    world.on_tick = lambda: world.quota.release("k1", "other")
    assert world.engine.run(batch_id).status == RunStatus.SUCCEEDED
    assert world.batches.get("k1", batch_id)["status"] == "completed"
    assert world.clock.sleeps[0] == 5.0  # it waited a poll for the place


def test_quota_is_per_owner_and_overall(tmp_path: Path) -> None:
    quota = BatchQuota(FakeKV(), per_owner=2, total=3)
    assert quota.reserve("k1", "a") and quota.reserve("k1", "a")  # twice is once
    assert quota.reserve("k1", "b") and not quota.reserve("k1", "c")
    assert quota.reserve("k2", "d") and not quota.reserve("k2", "e")  # total reached
    assert quota.held("k2") == ["d"]  # the refused one was rolled back
    quota.release("k1", "a")
    quota.release("k1", "a")
    assert quota.reserve("k2", "e")


class NoRoom(ModelLimits):
    """Limits under which this worker never takes a line."""

    def available(self, model: str | None, in_flight: Mapping[str, int]) -> int:
        return 0


def test_a_line_whose_workers_keep_dying_is_reported_not_lost(tmp_path: Path) -> None:
    world = World(tmp_path, max_attempts=2)
    batch_id = world.submit([line("a", "a")])
    world.runner.limits = NoRoom()  # only the doomed workers lease

    def doomed_worker() -> None:
        world.queue_for(batch_id).lease(10, "doomed")  # leases, then dies
        world.clock.advance(61)  # past its visibility timeout

    world.on_tick = doomed_worker
    assert world.engine.run(batch_id).status == RunStatus.SUCCEEDED
    batch = world.batches.get("k1", batch_id)
    assert batch["status"] == "completed" and batch["output_file_id"] is None
    [error] = world.lines_of(batch["error_file_id"])
    assert error["custom_id"] == "a" and error["error"]["code"] == "server_error"
    assert "lease expired 2 times" in error["error"]["message"]
    world.assert_released(batch_id)


def test_the_wait_looks_sooner_when_the_lines_left_should_end_sooner() -> None:
    assert next_poll_s(100, 0.0, 2.0) == 2.0  # no rate yet: the configured poll
    assert next_poll_s(1000, 100.0, 2.0) == 2.0  # 10 s of lines left
    assert next_poll_s(50, 100.0, 2.0) == 0.5  # half a second left
    assert next_poll_s(1, 100.0, 2.0) == 0.1  # never a busy loop
