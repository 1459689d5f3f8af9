"""The continuous engine: iteration-level scheduling on one decode thread.

Each iteration of the engine's thread
1. admits waiting sequences in arrival order while they fit the KV budget and the running batch
   (app.serving.engines.scheduler), up to max_prefill_tokens of prompt: interactive ones
   first, batch jobs' lines only within the card's batch_share of the rows and the budget;
2. prefills them as a batch of their own, which gives each its first token, and joins that
   batch to the running one (DecodeBatch.absorb);
3. runs one decode step for every running sequence (on a CPU, batch lines' rows are set aside,
   cache and all, while interactive sequences decode: `background_pause_s`);
4. drops the sequences that finished, failed or were cancelled, with their KV cache rows, and
   returns their reservations to the budget.

So a request that arrives while others decode waits for at most one iteration plus its own
prefill, not for a whole batch to end, and a short request leaves the batch when it is done.

Why our own scheduler and not transformers' ContinuousBatchingManager (`init_continuous_batching`):
its paged cache and scheduler take one generation config for all requests (per-request
temperature and top_p only when the config enables them; no per-request seed and no stop
strings), and on this project's 2-core CPU machine it generated 127 tok/s where batched
`generate` reached 296 for the same 64 prompts (issue 12). This engine decodes with the model's
own forward and DynamicCache, so every request keeps its own sampling, seed, stop sequences and
streaming exactly as the static engine gives them (greedy output is identical). What it does
not have that a paged cache gives: prefix sharing between requests, and a cache without padding
(the right-aligned batch pads short rows up to the longest; admission counts that padding).

Tokens reach each request's asyncio queue through its event loop's call_soon_threadsafe, so the
replica's event loop never waits on a forward pass.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from app.api.errors import InvalidRequestError, OverloadedError
from app.catalog.cards import ModelCard
from app.catalog.engine import EngineKind
from app.serving.engines.base import Engine, EngineStats, final, tokenizer_call
from app.serving.engines.scheduler import ExceedsCapacity, QueueFull, Scheduler
from app.serving.runners.base import GenerationRequest, RowError, StepEntry, TokenDelta
from app.serving.runners.text import TransformersCausalLMRunner
from app.serving.runners.text_batch import DecodeBatch, Row, UnmergeableCache

logger = logging.getLogger(__name__)

_END: Any = object()  # put in a sequence's outbox when it left the batch without a final entry
RATE_HALF_LIFE_S = 5.0  # how fast the generated-tokens rate (for Retry-After) forgets


@dataclass(eq=False)
class _Sequence:
    """One request inside the engine: its decode row, prompt and way back to its reader."""

    row: Row
    prompt: list[int]
    loop: asyncio.AbstractEventLoop
    outbox: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)

    @property
    def reservation(self) -> int:
        return self.row.reservation

    @property
    def prompt_tokens(self) -> int:
        return self.row.prompt_tokens

    @property
    def max_tokens(self) -> int:
        return self.row.request.max_tokens

    @property
    def cancelled(self) -> bool:
        return self.row.request.cancel.is_set()

    @property
    def background(self) -> bool:
        return self.row.request.background

    def send(self, entry: Any) -> None:
        """Put one entry in the outbox, from the decode thread (a step's tokens go in bulk,
        ContinuousEngine._step)."""
        with suppress(RuntimeError):  # its event loop has closed: nobody is reading
            self.loop.call_soon_threadsafe(self.outbox.put_nowait, entry)


class _Rate:
    """Generated tokens per second, exponentially weighted over the last few seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._at = clock()
        self.per_s = 0.0

    def add(self, tokens: int) -> None:
        now = self._clock()
        elapsed = max(now - self._at, 1e-6)
        self._at = now
        weight = 0.5 ** (elapsed / RATE_HALF_LIFE_S)
        self.per_s = weight * self.per_s + (1 - weight) * tokens / elapsed


class ContinuousEngine(Engine):
    kind = EngineKind.CONTINUOUS

    def __init__(
        self,
        runner: TransformersCausalLMRunner,
        card: ModelCard,
        capacity_tokens: int,
        on_batch: Callable[[int], None] = lambda size: None,
    ) -> None:
        self.runner = runner
        self.model_id = card.id
        self._scheduler: Scheduler[_Sequence] = Scheduler(
            capacity_tokens,
            max_running=card.engine_max_running,
            max_waiting=card.engine_max_waiting,
            max_prefill_tokens=card.engine.max_prefill_tokens,
            max_prefill_delay_steps=card.engine.max_prefill_delay_steps,
            background_share=card.batch_share,
        )
        self._since_prefill = 0  # decode steps since the last prefill (decode thread only)
        self._pause_s = card.engine.background_pause_for(runner.device)
        self._on_batch = on_batch
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        # Owned by the decode thread: the running batch and its sequences, row for row.
        self._batch: DecodeBatch | None = None
        self._sequences: list[_Sequence] = []
        # Batch lines set aside while interactive sequences decode (still in the scheduler's
        # running set: their cache is kept); since when they stand aside, and until when they
        # decode beside the interactive sequences instead.
        self._paused: DecodeBatch | None = None
        self._paused_sequences: list[_Sequence] = []
        self._yield_since: float | None = None
        self._together_until = 0.0
        self._rate = _Rate()

    # ---- the request side (the replica's event loop) -----------------------------------------

    def stats(self) -> EngineStats:
        with self._cond:
            scheduler = self._scheduler
            return EngineStats(
                self.kind.value,
                scheduler.queued,
                len(scheduler.running),
                round(scheduler.utilization, 4),
                scheduler.capacity_tokens,
                len(self._paused_sequences) if self._pause_s else None,
            )

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StepEntry]:
        prepared = await tokenizer_call(len(request.prompt), self.runner.prepare, request)
        if isinstance(prepared, RowError):
            yield prepared
            return
        row, prompt = prepared
        sequence = _Sequence(row, prompt, asyncio.get_running_loop())
        self._offer(sequence)
        try:
            while True:
                entry = await sequence.outbox.get()
                if entry is _END:
                    return
                yield entry
                if final(entry):
                    return
        finally:
            request.cancel.set()  # a no-op once it finished; else the thread drops it next step

    def _offer(self, sequence: _Sequence) -> None:
        with self._cond:
            if self._closed:
                raise OverloadedError(f"model {self.model_id!r} is shutting down", retry_after_s=1)
            try:
                self._scheduler.offer(sequence, self._rate.per_s)
            except ExceedsCapacity as exc:
                raise InvalidRequestError(str(exc), param="max_tokens") from exc
            except QueueFull as exc:
                raise OverloadedError(
                    f"model {self.model_id!r}: {exc}", retry_after_s=exc.retry_after_s
                ) from exc
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"engine-{self.model_id}", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=5)  # the current step ends; the thread then fails the rest

    # ---- the decode thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while (
                        not self._closed
                        and self._batch is None
                        and self._paused is None
                        and not self._scheduler.queued
                    ):
                        self._cond.wait()
                    if self._closed:
                        break
                    due = self._scheduler.prefill_due(
                        self._since_prefill, background=not self._yielding()
                    )
                    taken = self._admit() if due else []
                self._since_prefill = 0 if taken else self._since_prefill + 1
                try:
                    self._iterate(taken)
                except Exception as exc:  # a failed forward pass fails the sequences it carried
                    logger.exception("%s: decode iteration failed", self.model_id)
                    self._fail(exc, taken)
        except BaseException as exc:  # the thread itself is dying: nobody may wait on it
            logger.exception("%s: decode thread failed", self.model_id)
            self._fail(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)), [])
            self._fail_waiting(RuntimeError(f"the decode thread failed: {exc!r}"))
            with self._cond:
                self._thread = None  # the next request starts a new one
            raise
        self._fail(RuntimeError("the engine stopped"), [])
        self._fail_waiting(RuntimeError("the engine stopped"))

    def _iterate(self, taken: list[_Sequence]) -> None:
        if taken:
            try:
                fresh = self.runner.start_batch([s.row for s in taken], [s.prompt for s in taken])
                self._step(fresh, taken)
            except Exception as exc:  # the prefill failed: its sequences fail, the batch goes on
                logger.exception("%s: prefill of %d sequences failed", self.model_id, len(taken))
                self._fail(exc, taken, batch_too=False)
                taken = []
        if taken:
            if self._batch is None:
                self._batch, self._sequences = fresh, list(taken)
            else:
                self._batch.absorb(fresh)
                self._sequences.extend(taken)
            self._reap()
        if self._pause_s:
            self._balance()
        if self._batch is not None:
            self._step(self._batch, self._sequences, decode=True)
            self._reap()

    # ---- batch lines yield to interactive sequences ------------------------------------------

    def _admit(self) -> list[_Sequence]:
        """The scheduler's admission (under the lock). Lines that would be set aside at once
        are not prefilled beside an interactive sequence's prompt either."""
        alone = self._pause_s > 0 and time.monotonic() >= self._together_until
        return self._scheduler.admit(
            background=not self._yielding(), background_with_interactive=not alone
        )

    def _yielding(self) -> bool:
        """Whether batch lines stand aside now: interactive sequences decode, and the lines
        are not in their turn to decode beside them."""
        return (
            self._pause_s > 0
            and time.monotonic() >= self._together_until
            and any(not s.background for s in self._sequences)
        )

    def _balance(self) -> None:
        """Set the batch lines' rows aside while interactive sequences decode, and join them
        back when none does. After background_pause_s of standing aside (set aside, or kept
        waiting), the lines decode beside the interactive sequences for as long again, so a
        batch progresses under any load."""
        self._reap_paused()
        now = time.monotonic()
        if not any(not s.background for s in self._sequences):
            self._yield_since = None
        elif now >= self._together_until:
            if self._yield_since is None:
                self._yield_since = now
            if now - self._yield_since < self._pause_s:
                lines = [i for i, s in enumerate(self._sequences) if s.background]
                if lines:
                    self._set_aside(lines)
                return
            self._together_until, self._yield_since = now + self._pause_s, None
        if self._paused is not None:
            self._resume()

    def _set_aside(self, indices: list[int]) -> None:
        assert self._batch is not None
        moved = self._batch.split(indices)
        if moved is None:  # a cache that cannot be cut (checked at load, so a changed model)
            logger.warning("%s: batch lines cannot be set aside; they decode on", self.model_id)
            self._pause_s = 0.0
            if self._paused is not None:
                self._resume()
            return
        chosen = set(indices)
        lines = [s for i, s in enumerate(self._sequences) if i in chosen]
        self._sequences = [s for i, s in enumerate(self._sequences) if i not in chosen]
        # Joined before the lists change hands: if the join fails, _fail still finds every
        # sequence in the scheduler's running set.
        if self._paused is not None:
            self._paused.absorb(moved)
            moved = self._paused
        self._paused, self._paused_sequences = moved, self._paused_sequences + lines

    def _resume(self) -> None:
        paused, lines = self._paused, self._paused_sequences
        assert paused is not None
        if self._batch is None:
            self._batch, self._sequences = paused, lines
        else:
            self._batch.absorb(paused)
            self._sequences = self._sequences + lines
        self._paused, self._paused_sequences = None, []
        self._reap()  # lines cancelled while set aside

    def _reap_paused(self) -> None:
        """Drop lines cancelled while set aside, with their cache rows and budget (for a cache
        that cannot be cut, they leave when the lines rejoin the batch)."""
        if self._paused is not None:
            reaped = self._drop_ended(self._paused, self._paused_sequences)
            if reaped is not None:
                self._paused, self._paused_sequences = reaped

    def _step(self, batch: DecodeBatch, sequences: list[_Sequence], decode: bool = False) -> None:
        """One forward pass; the budget of sequences it ended is returned before their readers
        see their last entry, so a client that sends its next request on seeing it finds the
        room its last one left. A decode step also tells on_batch how many rows it ran."""
        size = len(sequences)
        entries = batch.step()
        ended = [s for s, row in zip(sequences, batch.rows, strict=True) if not row.live]
        if ended:
            with self._cond:
                self._scheduler.release(ended)
        tokens = 0
        mail: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}
        for sequence, entry in zip(sequences, entries, strict=True):
            if entry is not None:
                mail.setdefault(sequence.loop, []).append((sequence.outbox, entry))
                if isinstance(entry, TokenDelta):
                    tokens += entry.tokens
        # One wake-up per event loop per step, not one per sequence: each is a write to the
        # loop's self-pipe and a turn of the loop, which at hundreds of sequences would cost
        # more than the step. The batch size rides along with the first loop's tokens.
        first = sequences[0].loop
        if decode:
            mail.setdefault(first, [])
        for loop, letters in mail.items():
            count = size if decode and loop is first else None
            with suppress(RuntimeError):  # the loop has closed: nobody is reading
                loop.call_soon_threadsafe(self._post, letters, count)
        self._rate.add(tokens)

    def _reap(self) -> None:
        """Drop the sequences that are no longer live, with their cache rows and budget."""
        assert self._batch is not None
        reaped = self._drop_ended(self._batch, self._sequences)
        if reaped is None:  # checked when the engine was made (probe), so a model that changed
            raise UnmergeableCache("the model's KV cache cannot drop rows")
        self._batch, self._sequences = reaped

    def _drop_ended(
        self, batch: DecodeBatch, sequences: list[_Sequence]
    ) -> tuple[DecodeBatch | None, list[_Sequence]] | None:
        """`batch` (its rows and `sequences` in step) without its rows that are no longer
        live, whose readers get their end and whose budget goes back: the batch left (None
        once empty) and its sequences; None, and nothing dropped, if its cache cannot be cut."""
        keep = [i for i, row in enumerate(batch.rows) if row.live]
        if len(keep) == len(batch.rows):
            return batch, sequences
        kept = set(keep)
        gone = [s for i, s in enumerate(sequences) if i not in kept]
        if keep and not batch.keep(keep):
            return None
        for sequence in gone:
            sequence.send(_END)
        with self._cond:
            self._scheduler.release(gone)
        return (batch, [sequences[i] for i in keep]) if keep else (None, [])

    def _fail(self, error: Exception, taken: list[_Sequence], batch_too: bool = True) -> None:
        """The sequences just admitted, and (batch_too) every one admitted and not yet ended
        (decoding, set aside, or between the two when a join failed), fail with `error`."""
        if batch_too:
            with self._cond:
                running = list(self._scheduler.running)
        else:
            running = []
        failed = running + [s for s in taken if s not in running]
        for sequence in failed:
            sequence.send(RowError(error))
        if batch_too:
            self._batch, self._sequences = None, []
            self._paused, self._paused_sequences = None, []
        with self._cond:
            self._scheduler.release(failed)

    def _fail_waiting(self, error: Exception) -> None:
        with self._cond:
            waiting = self._scheduler.drain()
        for sequence in waiting:
            sequence.send(RowError(error))

    def _post(self, letters: list[tuple[asyncio.Queue[Any], Any]], size: int | None) -> None:
        """On an event loop: hand a step's entries to their readers (and its size to
        on_batch)."""
        for outbox, entry in letters:
            outbox.put_nowait(entry)
        if size is not None:
            self._on_batch(size)


def probe(runner: TransformersCausalLMRunner) -> None:
    """Decode two short sequences the way the engine does (prefill, join, step, drop one), so a
    model whose cache cannot be joined or cut fails at load time, not on a client's request.
    Raises UnmergeableCache."""
    prepared = [runner.prepare(GenerationRequest("Hello", 3, temperature=0.0)) for _ in range(2)]
    pairs = [p for p in prepared if not isinstance(p, RowError)]
    if len(pairs) != 2:
        raise UnmergeableCache("the probe prompt could not be prepared")
    first = runner.start_batch([pairs[0][0]], [pairs[0][1]])
    first.step()
    second = runner.start_batch([pairs[1][0]], [pairs[1][1]])
    second.step()
    first.absorb(second)
    first.step()
    if not first.keep([1]):
        raise UnmergeableCache("the model's KV cache cannot drop rows")
