"""The continuous engine on the real tiny Llama (no Ray): the same tokens as the static engine,
requests joining mid-flight, cancellation freeing the KV budget at once, stop sequences and
max_tokens, refusals when the budget is full, streaming order, and the card's engine choice."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from app.api.errors import InternalError, InvalidRequestError, OverloadedError
from app.catalog.cards import ModelCard, load_catalogue
from app.catalog.engine import EngineKind, EngineSettings
from app.catalog.recipes import build_card
from app.serving.batching import LocalBatcher
from app.serving.decoding import SequenceDecoder
from app.serving.engines import make_engine
from app.serving.engines.continuous import ContinuousEngine
from app.serving.engines.static import StaticEngine
from app.serving.runners.base import GenerationRequest, RowError, RunnerError, TokenDelta
from app.serving.runners.echo import EchoRunner
from app.serving.runners.text import TransformersCausalLMRunner
from app.serving.runners.text_batch import DecodeBatch
from app.serving.service import ModelService

CATALOGUE = load_catalogue(Path(__file__).resolve().parents[2] / "models")
PROMPTS = [
    "Hi",
    "The weather is nice today: the sky is blue and the birds",
    "Paris é 世界",
    "Once upon a time there was a",
]


class CountingLlama(TransformersCausalLMRunner):
    """The transformers runner, recording the rows of every forward pass; with fail_prefill
    set, a prefill (a pass of more than one token per row) raises."""

    forwards: list[int]
    fail_prefill = False

    def _forward(self, input_ids: Any, *args: Any) -> Any:
        self.forwards.append(int(input_ids.shape[0]))
        if self.fail_prefill and input_ids.shape[1] > 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return super()._forward(input_ids, *args)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> CountingLlama:
    card = CATALOGUE.get("tiny-llama")
    assert card is not None
    source = str(build_card(card, tmp_path_factory.mktemp("llama")))
    # benchmarks/gpu_check.py runs these tests on a GPU with APP_TEST_DEVICE=cuda.
    runner = CountingLlama(card, source, os.environ.get("APP_TEST_DEVICE", "cpu"))
    runner.load()
    runner.forwards = []
    return runner


def card_with(llama: TransformersCausalLMRunner, **engine: Any) -> ModelCard:
    return llama.card.model_copy(update={"engine": EngineSettings.model_validate(engine)})


def decoder(
    llama: TransformersCausalLMRunner, *, batch_share: float | None = None, **engine: Any
) -> SequenceDecoder:
    card = card_with(llama, **engine)
    if batch_share is not None:
        card = card.model_copy(update={"batch_share": batch_share})
    return SequenceDecoder(make_engine(card, llama, LocalBatcher(8, 0.02)))


def greedy(prompt: str, max_tokens: int = 16, **fields: Any) -> GenerationRequest:
    return GenerationRequest(prompt, max_tokens, temperature=0.0, **fields)


async def collect_all(
    dec: SequenceDecoder, requests: list[GenerationRequest]
) -> list[tuple[str, int, str]]:
    return list(await asyncio.gather(*(dec.collect(r) for r in requests)))


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.005)


async def lines_set_aside(
    dec: SequenceDecoder, *, line_tokens: int, interactive_tokens: int
) -> tuple[list[asyncio.Task[tuple[str, int, str]]], asyncio.Task[tuple[str, int, str]]]:
    """Two batch lines decoding, then an interactive request that sets them aside (once it
    has, both are returned running)."""
    lines = [
        asyncio.create_task(dec.collect(greedy(p, line_tokens, background=True)))
        for p in PROMPTS[:2]
    ]
    await until(lambda: dec.engine.stats().running == 2)
    interactive = asyncio.create_task(dec.collect(greedy(PROMPTS[3], interactive_tokens)))
    await until(lambda: dec.engine.stats().paused == 2)
    return lines, interactive


# --- the same output as the static engine ------------------------------------------------------


async def test_greedy_output_equals_the_static_engines(llama: CountingLlama) -> None:
    static = decoder(llama, kind="static")
    continuous = decoder(llama, kind="continuous")
    assert isinstance(continuous.engine, ContinuousEngine)
    requests = [greedy(p, 12 + 4 * i) for i, p in enumerate(PROMPTS)]
    expected = await collect_all(static, requests)
    got = await collect_all(continuous, [greedy(p, 12 + 4 * i) for i, p in enumerate(PROMPTS)])
    assert got == expected
    assert len({text for text, _, _ in got}) == len(PROMPTS)
    continuous.engine.close()


async def test_a_request_joining_mid_flight_gets_its_tokens_alone(llama: CountingLlama) -> None:
    dec = decoder(llama, kind="continuous")
    alone = await dec.collect(greedy(PROMPTS[1], 24))
    long = asyncio.create_task(dec.collect(greedy(PROMPTS[0], 120)))
    llama.forwards = []
    await until(lambda: len(llama.forwards) >= 10)  # the long one is decoding alone
    joined = await dec.collect(greedy(PROMPTS[1], 24))
    assert joined == alone
    # It ran beside the long one (two-row decode steps) and the long one went on after it.
    assert 2 in llama.forwards
    _, _, reason = await long
    assert reason == "length"
    assert llama.forwards[-1] == 1
    dec.engine.close()


async def test_batch_lines_leave_rows_to_interactive_requests(llama: CountingLlama) -> None:
    dec = decoder(llama, kind="continuous", max_running=4, batch_share=0.5)  # 2 rows for lines
    engine = dec.engine
    alone = await dec.collect(greedy(PROMPTS[1], 8))
    lines = [asyncio.create_task(dec.collect(greedy(p, 200, background=True))) for p in PROMPTS]
    await until(lambda: engine.stats().running == 2)
    assert engine.stats().queued == 2  # two rows are free, but batch work has its share
    # An interactive request runs at once beside the lines, with the tokens it gets alone.
    assert await dec.collect(greedy(PROMPTS[1], 8)) == alone
    assert not any(line.done() for line in lines)
    for line in lines:
        line.cancel()
    await asyncio.gather(*lines, return_exceptions=True)
    await until(lambda: engine.stats().running == 0)
    engine.close()


def test_rows_split_off_and_joined_back_decode_as_they_would_alone(llama: CountingLlama) -> None:
    def decode(prompts: list[str], steps: int, split_at: int | None = None) -> list[str]:
        prepared = [llama.prepare(greedy(p, steps)) for p in prompts]
        pairs = [p for p in prepared if not isinstance(p, RowError)]
        batch = llama.start_batch([row for row, _ in pairs], [ids for _, ids in pairs])
        aside = None
        for step in range(steps):
            if step == split_at:
                aside = batch.split([0, 2])
                assert aside is not None and len(aside) == 2 and len(batch) == 1
            if aside is not None and split_at is not None and step < split_at + 5:  # five steps
                batch.step()
                continue
            if aside is not None:
                batch.absorb(aside)
                aside = None
            batch.step()
        return [row.text for row, _ in pairs]

    alone = [decode([p], 20)[0] for p in PROMPTS[:3]]
    assert decode(PROMPTS[:3], 20, split_at=3)[1] == alone[1]
    # The rows set aside fell five steps behind, then caught up after the join.
    prepared = [llama.prepare(greedy(p, 30)) for p in PROMPTS[:3]]
    pairs = [p for p in prepared if not isinstance(p, RowError)]
    batch = llama.start_batch([row for row, _ in pairs], [ids for _, ids in pairs])
    for _ in range(3):
        batch.step()
    aside = batch.split([0, 2])
    assert aside is not None
    for _ in range(5):
        batch.step()
    batch.absorb(aside)
    while any(row.live for row in batch.rows):
        batch.step()
    texts = {id(row): row.text for row in batch.rows}
    for (row, _), prompt in zip(pairs, PROMPTS[:3], strict=True):
        assert texts[id(row)] == decode([prompt], 30)[0]


async def test_batch_lines_stand_aside_while_interactive_requests_decode(
    llama: CountingLlama,
) -> None:
    dec = decoder(llama, kind="continuous", max_running=8, background_pause_s=30)
    engine = dec.engine
    alone = [await dec.collect(greedy(p, 60)) for p in PROMPTS[:2]]
    lines, interactive = await lines_set_aside(dec, line_tokens=60, interactive_tokens=100)
    llama.forwards = []
    await until(lambda: len(llama.forwards) >= 20)
    assert set(llama.forwards) == {1}  # the interactive request decodes alone
    assert engine.stats().running == 3  # the lines keep their place and cache
    await interactive
    assert [await line for line in lines] == alone  # then they finish, as they would alone
    assert engine.stats().paused == 0
    engine.close()


async def test_batch_lines_still_progress_under_steady_interactive_load(
    llama: CountingLlama,
) -> None:
    dec = decoder(llama, kind="continuous", max_running=8, background_pause_s=0.05)
    interactive = asyncio.create_task(dec.collect(greedy(PROMPTS[3], 480)))
    await until(lambda: dec.engine.stats().running == 1)
    lines = [asyncio.create_task(dec.collect(greedy(p, 40, background=True))) for p in PROMPTS[:2]]
    await asyncio.gather(*lines)  # taking turns: 0.05 s aside, then 0.05 s beside it
    assert not interactive.done()
    await interactive
    dec.engine.close()


async def test_a_line_cancelled_while_set_aside_gives_its_budget_back_at_once(
    llama: CountingLlama,
) -> None:
    dec = decoder(llama, kind="continuous", max_running=8, background_pause_s=30)
    engine = dec.engine
    lines, interactive = await lines_set_aside(dec, line_tokens=60, interactive_tokens=300)
    lines[0].cancel()
    await until(lambda: engine.stats().paused == 1 and engine.stats().running == 2)
    assert not interactive.done()  # dropped while still set aside, not at the rejoin
    await interactive
    await lines[1]
    await until(lambda: engine.stats().running == 0)
    engine.close()


async def test_a_failed_rejoin_fails_every_sequence_and_keeps_no_budget(
    llama: CountingLlama, monkeypatch: pytest.MonkeyPatch
) -> None:
    dec = decoder(llama, kind="continuous", max_running=8, background_pause_s=0.05)
    engine = dec.engine
    lines, interactive = await lines_set_aside(dec, line_tokens=300, interactive_tokens=480)

    def broken(self: DecodeBatch, other: DecodeBatch) -> None:
        raise RuntimeError("out of memory while joining (simulated)")

    monkeypatch.setattr(DecodeBatch, "absorb", broken)  # the lines' turn to rejoin fails
    outcomes = await asyncio.gather(*lines, interactive, return_exceptions=True)
    assert all(isinstance(o, Exception) for o in outcomes)  # every reader hears of it
    monkeypatch.undo()
    await until(lambda: engine.stats().running == 0)
    assert engine.stats().kv_cache_utilization == 0
    assert (await dec.collect(greedy(PROMPTS[1], 4)))[2] == "length"  # and the engine goes on
    engine.close()


async def test_seeded_sampling_is_reproducible_and_per_request(llama: CountingLlama) -> None:
    def sampled(seed: int) -> GenerationRequest:
        return GenerationRequest("Tell me a story", 16, temperature=0.9, top_p=0.9, seed=seed)

    static = decoder(llama, kind="static")
    continuous = decoder(llama, kind="continuous")
    expected = await collect_all(static, [sampled(1), sampled(2), greedy("filler", 4)])
    got = await collect_all(continuous, [sampled(1), sampled(2), greedy("filler", 4)])
    assert got == expected
    assert got[0][0] != got[1][0]
    continuous.engine.close()


# --- stop sequences, max_tokens, streaming -----------------------------------------------------


async def test_max_tokens_and_stop_sequences(llama: CountingLlama) -> None:
    dec = decoder(llama, kind="continuous")
    text, tokens, reason = await dec.collect(greedy(PROMPTS[3], 9))
    assert (tokens, reason) == (9, "length")
    stop = text.strip().split()[1]  # a word the completion is known to contain
    cut, _, cut_reason = await dec.collect(greedy(PROMPTS[3], 9, stop=(stop,)))
    assert cut_reason == "stop"
    assert stop not in cut
    assert text.startswith(cut)
    one, one_tokens, _ = await dec.collect(greedy(PROMPTS[3], 1))
    assert one_tokens == 1 and text.startswith(one)
    dec.engine.close()


async def test_deltas_stream_in_order_with_one_final(llama: CountingLlama) -> None:
    dec = decoder(llama, kind="continuous")
    request = greedy(PROMPTS[2], 20)
    deltas = [d async for d in dec.deltas(request)]
    assert all(isinstance(d, TokenDelta) for d in deltas)
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert deltas[-1].finish_reason == "length"
    assert sum(d.tokens for d in deltas) == 20
    text, _, _ = await dec.collect(greedy(PROMPTS[2], 20))
    assert "".join(d.text for d in deltas) == text
    dec.engine.close()


# --- cancellation and the KV budget ------------------------------------------------------------


async def test_cancellation_frees_the_budget_at_once(llama: CountingLlama) -> None:
    dec = decoder(llama, kind="continuous")
    engine = dec.engine
    long = asyncio.create_task(dec.collect(greedy(PROMPTS[0], 400)))
    short = asyncio.create_task(dec.collect(greedy(PROMPTS[1], 30)))
    await until(lambda: engine.stats().running == 2)
    busy = engine.stats().kv_cache_utilization
    assert busy is not None and busy > 0
    llama.forwards = []
    long.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long
    await until(lambda: engine.stats().running <= 1)
    after = engine.stats().kv_cache_utilization
    assert after is not None and after < busy
    await short
    await until(lambda: engine.stats().running == 0)
    assert engine.stats().kv_cache_utilization == 0
    assert len(llama.forwards) < 60  # the cancelled one did not decode on to 400
    engine.close()


async def test_a_full_budget_refuses_with_429_and_retry_after(llama: CountingLlama) -> None:
    # Room for one 100-position sequence, and none may wait.
    dec = decoder(llama, kind="continuous", kv_cache_tokens=100, max_waiting=0)
    first = asyncio.create_task(dec.collect(greedy(PROMPTS[0], 90)))
    await until(lambda: dec.engine.stats().running == 1)
    with pytest.raises(OverloadedError) as refused:
        await dec.collect(greedy(PROMPTS[0], 90))
    assert refused.value.status == 429
    assert refused.value.retry_after_s is not None and refused.value.retry_after_s >= 1
    await first
    # Freed: the same request now runs.
    assert (await dec.collect(greedy(PROMPTS[0], 90)))[2] == "length"
    dec.engine.close()


async def test_waiting_requests_queue_within_max_waiting(llama: CountingLlama) -> None:
    dec = decoder(llama, kind="continuous", kv_cache_tokens=100, max_waiting=1)
    results = await collect_all(dec, [greedy(PROMPTS[0], 60), greedy(PROMPTS[0], 60)])
    assert [r[2] for r in results] == ["length", "length"]
    assert results[0] == results[1]
    dec.engine.close()


async def test_a_request_larger_than_the_whole_cache_is_a_400(llama: CountingLlama) -> None:
    dec = decoder(llama, kind="continuous", kv_cache_tokens=50)
    with pytest.raises(InvalidRequestError, match="KV cache") as refused:
        await dec.collect(greedy(PROMPTS[0], 60))
    assert refused.value.status == 400
    dec.engine.close()


async def test_a_failed_prefill_fails_its_requests_and_the_batch_goes_on(
    llama: CountingLlama,
) -> None:
    dec = decoder(llama, kind="continuous")
    expected = await dec.collect(greedy(PROMPTS[0], 200))
    running = asyncio.create_task(dec.collect(greedy(PROMPTS[0], 200)))
    await until(lambda: dec.engine.stats().running == 1)
    llama.fail_prefill = True
    try:
        with pytest.raises(InternalError, match="out of memory"):
            await dec.collect(greedy(PROMPTS[1], 8))
    finally:
        llama.fail_prefill = False
    assert await running == expected
    assert dec.engine.stats().running == 0
    dec.engine.close()


async def test_a_bad_prompt_fails_alone(llama: CountingLlama) -> None:
    dec = decoder(llama, kind="continuous")
    good = asyncio.create_task(dec.collect(greedy(PROMPTS[3], 20)))
    with pytest.raises(InvalidRequestError, match="max_context_tokens"):
        await dec.collect(greedy("word " * 600, 8))
    assert (await good)[2] == "length"
    dec.engine.close()


# --- choosing the engine -----------------------------------------------------------------------


def test_the_card_chooses_the_engine(llama: CountingLlama) -> None:
    batcher = LocalBatcher(8, 0.01)
    static = make_engine(card_with(llama, kind="static"), llama, batcher)
    assert isinstance(static, StaticEngine)
    chosen = make_engine(card_with(llama, kind="continuous"), llama, batcher)
    assert isinstance(chosen, ContinuousEngine)
    chosen.close()
    assert EngineKind.AUTO.resolve("cuda:0") is EngineKind.CONTINUOUS
    assert EngineSettings.model_validate("static").kind is EngineKind.STATIC


def test_continuous_needs_a_transformers_model() -> None:
    base = {"id": "echo", "task": "text-generation", "loader": "echo"}
    echo = ModelCard.model_validate(base | {"engine": "continuous"})
    with pytest.raises(RunnerError, match="transformers causal LM"):
        make_engine(echo, EchoRunner(echo, None), LocalBatcher(8, 0.01))
    auto = ModelCard.model_validate(base)
    assert isinstance(
        make_engine(auto, EchoRunner(auto, None), LocalBatcher(8, 0.01)), StaticEngine
    )


async def test_service_reports_engine_stats(llama: CountingLlama) -> None:
    svc = ModelService(card_with(llama, kind="continuous"), llama, batcher=LocalBatcher(8, 0.0))
    stats = svc.stats()["engine"]
    assert stats["engine"] == "continuous"
    assert stats["running"] == 0 and stats["queued"] == 0
    assert stats["kv_cache_tokens"] >= 1
    svc.close()


def test_static_drops_rows_cancelled_before_the_prefill(llama: CountingLlama) -> None:
    batch = [greedy(PROMPTS[0], 3), greedy(PROMPTS[1], 6), greedy(PROMPTS[2], 6)]
    batch[1].cancel.set()  # its caller left while serve.batch was gathering
    llama.forwards = []
    steps = list(llama.generate(batch))
    # Prefill and two decode steps for two rows, then the third row alone.
    assert llama.forwards == [2, 2, 2, 1, 1, 1]
    assert all(step[1] is None for step in steps)
