"""app.batches.runner and concurrency: the line worker over a real DurableQueue on a fake KV,
with a fake LineSender: overloads back off (not charged as attempts), 4xx answers are results,
errors are retried then reported, and a line run twice counts once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from app.api.errors import OverloadedError
from app.batches.concurrency import AIMDConfig, AIMDLimit, ModelLimits
from app.batches.output import ResultStore, read_counts, result_key, succeeded
from app.batches.runner import FULL_MODEL_HOLD_S, LineQueue, LineRunner, batch_queue
from app.jobs.queue import DurableQueue
from tests.unit.kv_fakes import FakeClock, FakeKV

Answer = tuple[int, dict[str, Any]] | Exception


class FakeSender:
    """Answers each custom_id's requests from a script (the last answer repeats)."""

    def __init__(self, script: dict[str, list[Answer]]) -> None:
        self.script = script
        self.calls: list[str] = []

    async def send(self, url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        custom_id = body["custom_id"]
        self.calls.append(custom_id)
        answers = self.script[custom_id]
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def ok(text: str = "hi") -> tuple[int, dict[str, Any]]:
    return 200, {"object": "chat.completion", "choices": [{"text": text}]}


class Rig:
    def __init__(
        self,
        script: dict[str, list[Answer]],
        max_attempts: int = 3,
        models: dict[str, str] | None = None,  # custom_id -> model (default: none named)
    ) -> None:
        self.clock = FakeClock()
        self.kv = FakeKV(self.clock)
        self.queue = batch_queue(self.kv, "b1", max_attempts=max_attempts, clock=self.clock)
        self.queue.enqueue(
            [
                (
                    f"b1:{c}",
                    {
                        "batch_id": "b1",
                        "custom_id": c,
                        "url": "/v1/x",
                        "body": {"custom_id": c} | ({"model": models[c]} if models else {}),
                    },
                )
                for c in script
            ]
        )
        self.sender = FakeSender(script)
        self.results = ResultStore(self.kv)
        self.limits = ModelLimits(AIMDConfig(initial=4, ceiling=8), clock=self.clock)
        self.runner = self.make_runner("w1")

    @property
    def limit(self) -> AIMDLimit:
        """The limit of the lines' model (these lines name none)."""
        return self.limits.of("")

    def make_runner(self, owner: str) -> LineRunner:
        queues: Callable[[], list[LineQueue]] = lambda: [self.queue]  # noqa: E731
        return LineRunner(
            self.sender, self.results, queues, owner=owner, limits=self.limits, clock=self.clock
        )

    async def step(self, runner: LineRunner | None = None) -> int:
        runner = runner or self.runner
        started = await runner.poll()
        await runner.drain()
        return started

    def result(self, custom_id: str) -> dict[str, Any] | None:
        return self.kv.value(result_key("b1", custom_id))


async def test_successes_are_stored_acked_and_counted() -> None:
    rig = Rig({"a": [ok("A")], "b": [ok("B")]})
    assert await rig.step() == 2
    record = rig.result("a")
    assert record is not None and succeeded(record)
    assert record["custom_id"] == "a" and record["error"] is None
    assert record["response"]["status_code"] == 200
    assert record["response"]["body"]["choices"][0]["text"] == "A"
    assert record["id"].startswith("batch_req_")
    stats = rig.queue.stats()
    assert (stats.pending, stats.leased, stats.done) == (0, 0, 2)
    assert read_counts(rig.kv, "b1") == (2, 0)
    assert rig.limit.limit > 4  # grew on success


async def test_a_4xx_answer_is_a_result_not_a_retry() -> None:
    bad = (400, {"error": {"message": "bad", "type": "invalid_request_error"}})
    rig = Rig({"a": [bad]})
    await rig.step()
    record = rig.result("a")
    assert record is not None and not succeeded(record)
    assert record["response"]["status_code"] == 400 and record["error"] is None
    assert rig.sender.calls == ["a"] and rig.queue.stats().done == 1
    assert read_counts(rig.kv, "b1") == (0, 1)


@pytest.mark.parametrize("retry_after", [7, None])
async def test_overload_backs_off_and_is_not_charged(retry_after: int | None) -> None:
    overload: Answer = (
        OverloadedError("busy", retry_after_s=retry_after) if retry_after else (429, {})
    )
    rig = Rig({"a": [overload, ok()]}, max_attempts=1)
    await rig.step()
    assert rig.result("a") is None
    assert rig.limit.limit == 2  # halved
    wait = retry_after or AIMDConfig().pause_s
    assert rig.limit.available(0) == 0 and rig.limit.pause_left() == wait
    assert rig.queue.lease(1, "peek") == []  # not due before Retry-After
    rig.clock.advance(wait)
    assert await rig.step() == 1  # max_attempts=1: the 429 used no attempt
    assert rig.result("a") is not None and rig.queue.stats().done == 1


async def test_one_cut_per_burst_of_overloads() -> None:
    limit = AIMDLimit(AIMDConfig(initial=8, ceiling=8), clock=FakeClock())
    limit.on_overload(2)
    limit.on_overload(2)
    limit.on_overload(None)
    assert limit.limit == 4


async def test_errors_are_retried_then_reported() -> None:
    rig = Rig(
        {"boom": [RuntimeError("replica died")], "five": [(500, {"error": {"message": "x"}})]}
    )
    for _ in range(3):
        await rig.step()
        rig.clock.advance(60)  # past the backoff
    assert rig.sender.calls.count("boom") == 3 and rig.sender.calls.count("five") == 3
    boom, five = rig.result("boom"), rig.result("five")
    assert boom is not None and boom["response"] is None
    assert boom["error"]["code"] == "server_error" and "replica died" in boom["error"]["message"]
    assert five is not None and five["response"]["status_code"] == 500
    assert rig.queue.stats().dead == 0 and rig.queue.stats().done == 2


async def test_an_error_before_the_last_attempt_is_nacked() -> None:
    rig = Rig({"a": [RuntimeError("x"), ok()]})
    await rig.step()
    assert rig.result("a") is None and rig.queue.stats().pending == 1
    rig.clock.advance(60)
    await rig.step()
    assert rig.result("a") is not None


async def test_a_line_run_twice_keeps_its_first_result() -> None:
    """Worker 1 stalls past its lease; worker 2 runs the line again. One result counts."""
    rig = Rig({"a": [ok("first"), ok("second")]})
    gate = asyncio.Event()
    slow_sender = rig.sender.send

    async def stalled(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        await gate.wait()
        return await slow_sender(url, body)

    w1 = rig.make_runner("w1")
    w1.sender = type("S", (), {"send": staticmethod(stalled)})()
    await w1.poll()  # leased by worker 1, which hangs
    await asyncio.sleep(0)
    rig.clock.advance(DurableQueue(rig.kv, "x").visibility_s + 1)  # its lease expires
    w2 = rig.make_runner("w2")
    await rig.step(w2)
    assert rig.result("a")["response"]["body"]["choices"][0]["text"] == "first"  # type: ignore[index]
    gate.set()
    await w1.drain()  # worker 1 finishes late: its result and ack are refused
    assert rig.result("a")["response"]["body"]["choices"][0]["text"] == "first"  # type: ignore[index]
    assert read_counts(rig.kv, "b1") == (1, 0)
    assert rig.queue.stats().done == 1


def test_slow_start_doubles_per_window_until_the_first_overload() -> None:
    limit = AIMDLimit(AIMDConfig(initial=2, ceiling=32), clock=FakeClock())
    for _ in range(2 + 4 + 8):  # three windows of successes: 2 -> 4 -> 8 -> 16
        limit.on_success()
    assert limit.limit == 16
    limit.on_overload(0)
    assert limit.limit == 8
    for _ in range(8):  # one window after the overload: additive, about one line
        limit.on_success()
    assert 8.9 < limit.limit < 9.1
    additive = AIMDLimit(AIMDConfig(initial=2, ceiling=32, slow_start=False), clock=FakeClock())
    for _ in range(14):
        additive.on_success()
    assert additive.limit < 6


async def test_a_full_worker_starts_the_next_line_when_one_ends_not_after_idling() -> None:
    class SlowSender(FakeSender):
        async def send(self, url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            await asyncio.sleep(0.01)
            return await super().send(url, body)

    rig = Rig({c: [ok()] for c in "abc"})
    rig.sender = SlowSender(rig.sender.script)
    rig.limits = ModelLimits(AIMDConfig(initial=1, ceiling=1), clock=rig.clock)  # one at a time
    runner = rig.make_runner("w1")
    stop = asyncio.Event()
    running = asyncio.create_task(runner.run(stop, idle_s=60))
    # Each line waits for the one before it to end; with an idle pause between them this
    # would take two minutes.
    async with asyncio.timeout(20):
        while rig.queue.stats().done < 3:
            await asyncio.sleep(0.01)
    stop.set()
    await running
    assert sorted(rig.sender.calls) == ["a", "b", "c"]


async def test_an_overloaded_model_pauses_its_own_batch_not_the_others() -> None:
    clock = FakeClock()
    kv = FakeKV(clock)
    script: dict[str, list[Answer]] = {"a0": [(429, {}), ok()], "a1": [ok()], "a2": [ok()]}
    script |= {f"b{n}": [ok()] for n in range(3)}
    queues = {b: line_queue(kv, clock, b, [c for c in script if c[0] == b]) for b in "ab"}
    limits = ModelLimits(AIMDConfig(initial=1, ceiling=8, pause_s=5), clock=clock)
    runner = LineRunner(
        FakeSender(script),
        ResultStore(kv),
        lambda: list(queues.values()),
        owner="w",
        limits=limits,
        clock=clock,
    )
    for _ in range(6):
        await runner.poll()
        await runner.drain()
    assert limits.of("m-a").pause_left() == 5 and limits.of("m-a").limit == 1
    assert (queues["a"].stats().done, queues["b"].stats().done) == (0, 3)
    assert limits.of("m-b").limit > 1
    clock.advance(5)
    for _ in range(6):
        await runner.poll()
        await runner.drain()
    assert queues["a"].stats().done == 3


def line_queue(kv: FakeKV, clock: FakeClock, batch: str, ids: list[str]) -> CountingQueue:
    """Batch `batch`'s queue with lines `ids`, all for model m-<batch>."""
    queue = CountingQueue(kv, f"batch:{batch}", clock=clock)
    queue.enqueue(
        [
            (
                f"{batch}:{c}",
                {
                    "batch_id": batch,
                    "custom_id": c,
                    "url": "/v1/x",
                    "body": {"model": f"m-{batch}", "custom_id": c},
                },
            )
            for c in ids
        ]
    )
    return queue


def test_model_limits_share_one_total() -> None:
    limits = ModelLimits(AIMDConfig(initial=2, ceiling=8, total=3), clock=FakeClock())
    assert limits.available(None, {}) == 2  # a queue's model not known yet: `initial`
    assert limits.available("a", {}) == 2
    assert limits.available("a", {"b": 2}) == 1  # the total of 3
    assert limits.available("a", {"a": 2}) == 0
    assert limits.available(None, {"a": 2}) == 1 and limits.available(None, {"a": 3}) == 0
    limits.of("a").on_overload(4.0)
    assert limits.available("a", {}) == 0 and limits.available("b", {}) == 2
    assert limits.describe({"b": 1})["a"] == {"limit": 1.0, "in_flight": 0, "paused_s": 4.0}


class CountingQueue(DurableQueue):
    """A DurableQueue that counts its leases and nacks."""

    leases = nacks = 0

    def lease(self, max_items: int, owner: str) -> list[Any]:
        self.leases += 1
        return super().lease(max_items, owner)

    def nack(self, *args: Any, **kwargs: Any) -> None:
        self.nacks += 1
        super().nack(*args, **kwargs)


async def test_a_full_model_holds_back_neither_other_batches_nor_the_queue() -> None:
    """Batch "slow" (model m-slow) fills its model's places with lines that do not end; batch
    "fast" (m-fast), whose model the worker has not seen, still runs, and the full model's
    queue is not read meanwhile (no lease and put back on every poll)."""
    clock = FakeClock()
    kv = FakeKV(clock)
    gate = asyncio.Event()

    class Sender:
        async def send(self, url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            if body["model"] == "m-slow":
                await gate.wait()
            return ok()

    queues = {b: line_queue(kv, clock, b, [str(n) for n in range(6)]) for b in ("slow", "fast")}
    limits = ModelLimits(AIMDConfig(initial=2, ceiling=2), clock=clock)
    runner = LineRunner(
        Sender(), ResultStore(kv), lambda: [queues["slow"]], owner="w", limits=limits, clock=clock
    )
    await runner.poll()  # learns the model with `initial` lines, its limit
    assert runner.in_flight == {"m-slow": 2}
    reads = queues["slow"].leases
    runner.queues = lambda: [queues["slow"], queues["fast"]]  # the fast batch arrives
    for _ in range(10):
        await runner.poll()
        await asyncio.sleep(0)
        clock.advance(0.1)
    assert queues["fast"].stats().done == 6
    assert queues["slow"].leases == reads and queues["slow"].nacks == 0
    gate.set()
    await runner.drain()
    assert queues["slow"].stats().done == 2


async def test_a_line_whose_model_is_full_goes_back_to_its_queue_briefly() -> None:
    """A batch mixing models: its queue, read for m-a, gives a line of m-b, whose one place a
    line of another batch holds. That line goes back, unchanged and uncharged, for
    FULL_MODEL_HOLD_S, and runs once m-b has a place."""
    clock = FakeClock()
    kv = FakeKV(clock)
    gate = asyncio.Event()

    class Sender:
        async def send(self, url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            if body.get("hold"):
                await gate.wait()
            return ok()

    held = line_queue(kv, clock, "b", ["held"])
    mixed = CountingQueue(kv, "batch:mixed", clock=clock)
    mixed.enqueue(
        [
            (f"mixed:{c}", {"batch_id": "mixed", "custom_id": c, "url": "/v1/x", "body": body})
            for c, body in (("a0", {"model": "m-a"}), ("b0", {"model": "m-b"}))
        ]
    )
    limits = ModelLimits(AIMDConfig(initial=1, ceiling=1), clock=clock)
    runner = LineRunner(
        Sender(), ResultStore(kv), lambda: [held], owner="w", limits=limits, clock=clock
    )
    held_lease = held.lease(1, "w")[0]
    held_lease.payload["body"]["hold"] = True
    await runner._start(held, held_lease)  # m-b's one place taken
    runner.queues = lambda: [mixed]
    await runner.poll()  # a0: m-a learnt and run
    async with asyncio.timeout(10):
        while runner.in_flight.get("m-a"):
            await asyncio.sleep(0.01)
    await runner.poll()  # b0: m-b full, back to the queue
    assert mixed.nacks == 1 and mixed.stats().done == 1
    assert mixed.lease(1, "peek") == []  # held back for a while
    gate.set()
    await runner.drain()
    clock.advance(FULL_MODEL_HOLD_S)
    await runner.poll()
    await runner.drain()
    assert mixed.stats().done == 2 and mixed.stats().dead == 0
