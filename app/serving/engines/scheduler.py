"""Which sequences the continuous engine decodes next, against its KV cache budget. Pure logic:
no torch, no threads (the engine holds a lock around every call).

A running batch keeps its rows right-aligned, so its cache is as wide as its longest live
context, and each row may grow to its reservation (prompt plus max_tokens). The batch can
therefore come to hold `rows * max(reservation)` positions, padding included, and that bound,
not the sum of the reservations, is what must fit the budget: admitting by it means the cache
never outgrows the memory it was sized from, whatever the rows generate.

Arrivals are prefilled together when a batch is running (`prefill_due`): each prefill costs a
forward pass of its own, which on a small batch costs about what a decode step does.

Admission is first come, first served within each of two classes: a sequence that does not fit
yet blocks the ones behind it rather than being overtaken for ever by smaller ones. Sequences
that could run at once are always accepted; beyond them at most `max_waiting` of each class
wait, and the next is refused (a 429 with Retry-After) rather than queued behind work that will
take longer than a client should wait.

The two classes: interactive sequences, and background ones (batch jobs' lines, app.batches).
Interactive sequences always go first, and background ones run only within `background_share`
of the running rows and of the KV budget (always one at least), so an interactive arrival finds
room at the next iteration instead of waiting for batch work to finish; and no background
sequence is admitted while an interactive one waits.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar


class Schedulable(Protocol):
    @property
    def reservation(self) -> int:
        """KV cache positions the sequence may come to hold."""

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def max_tokens(self) -> int: ...

    @property
    def cancelled(self) -> bool: ...

    @property
    def background(self) -> bool:
        """Batch work: admitted after interactive sequences, within the background share."""


S = TypeVar("S", bound=Schedulable)

RETRY_AFTER_MAX_S = 30


class ExceedsCapacity(ValueError):
    """The sequence alone needs more KV cache than the replica has: it can never run here."""


class QueueFull(RuntimeError):
    """Running and waiting places are taken; retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Scheduler(Generic[S]):
    def __init__(
        self,
        capacity_tokens: int,
        max_running: int,
        max_waiting: int,
        max_prefill_tokens: int,
        max_prefill_delay_steps: int = 0,
        background_share: float = 1.0,
    ) -> None:
        self.capacity_tokens = capacity_tokens
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens
        self.max_prefill_delay_steps = max_prefill_delay_steps
        self.background_rows = max(1, math.floor(max_running * background_share))
        self.background_tokens = math.floor(capacity_tokens * background_share)
        self.waiting: deque[S] = deque()  # interactive
        self.waiting_background: deque[S] = deque()
        self.running: list[S] = []

    def footprint(self, sequences: Iterable[S]) -> int:
        """KV positions a batch of these sequences may come to hold, padding included."""
        reservations = [s.reservation for s in sequences]
        return len(reservations) * max(reservations, default=0)

    def fitting(self, extra: Iterable[S], *, background: bool = False) -> int:
        """How many of `extra`, taken in order after the running batch, fit it: within
        max_running and the KV budget, and for background sequences within their share of
        both (the first background row always fits its share). One pass, since adding a
        sequence only ever grows the footprint (rows x widest reservation)."""
        rows = len(self.running)
        widest = max((s.reservation for s in self.running), default=0)
        own = sum(1 for s in self.running if s.background) if background else 0
        count = 0
        for sequence in extra:
            rows += 1
            widest = max(widest, sequence.reservation)
            if rows > self.max_running or rows * widest > self.capacity_tokens:
                break
            if background:
                own += 1
                if own > 1 and (
                    own > self.background_rows or own * widest > self.background_tokens
                ):
                    break
            count += 1
        return count

    @property
    def queued(self) -> int:
        """Sequences waiting, of both classes; cancelled ones are not (they leave the queues
        with the next admission)."""
        waiting = (*self.waiting, *self.waiting_background)
        return sum(1 for s in waiting if not s.cancelled)

    def drain(self) -> list[S]:
        """Take every waiting sequence out (the engine is failing them)."""
        gone = [*self.waiting, *self.waiting_background]
        self.waiting.clear()
        self.waiting_background.clear()
        return gone

    @property
    def utilization(self) -> float:
        """Share of the KV budget the running batch may come to fill."""
        return self.footprint(self.running) / self.capacity_tokens

    def offer(self, sequence: S, tokens_per_s: float = 0.0) -> None:
        """Queue a sequence, or refuse it: ExceedsCapacity if it can never fit, QueueFull if it
        cannot run now and max_waiting sequences of its class already wait."""
        self._drop_cancelled()
        if sequence.reservation > self.capacity_tokens:
            raise ExceedsCapacity(
                f"the prompt ({sequence.prompt_tokens} tokens) plus max_tokens "
                f"({sequence.max_tokens}) needs {sequence.reservation} KV cache positions, "
                f"more than this replica's whole cache holds ({self.capacity_tokens}); "
                "shorten the prompt or lower max_tokens"
            )
        # Everyone of its class already queued goes first, so "could run now" means after
        # all of them.
        background = sequence.background
        queue = self.waiting_background if background else self.waiting
        runnable = self.fitting([*queue, sequence], background=background)
        if runnable <= len(queue):  # it would not fit behind them
            blocked = len(queue) - runnable
            if blocked >= self.max_waiting:
                kind = "background " if background else ""
                raise QueueFull(
                    f"the KV cache and running batch are full for {kind}work "
                    f"({len(self.running)} sequences running, {len(queue)} waiting); "
                    "retry shortly",
                    self.retry_after_s(tokens_per_s, background=background),
                )
        queue.append(sequence)

    def _drop_cancelled(self) -> None:
        """Forget waiting sequences whose callers went away: they hold no place."""
        if any(s.cancelled for s in self.waiting):
            self.waiting = deque(s for s in self.waiting if not s.cancelled)
        if any(s.cancelled for s in self.waiting_background):
            self.waiting_background = deque(s for s in self.waiting_background if not s.cancelled)

    def prefill_due(self, steps_since_prefill: int, *, background: bool = True) -> bool:
        """Whether to prefill waiting sequences now. Each prefill is a forward pass of its own
        between decode steps, so while a batch runs, arrivals are gathered for up to
        max_prefill_delay_steps steps, or until there are enough of them (running / delay) that
        one pass serves many: a bounded wait for a new request, fewer passes for everyone.
        Background sequences count only when `background` says they may be admitted now."""
        self._drop_cancelled()
        arrivals = len(self.waiting) + (len(self.waiting_background) if background else 0)
        if not arrivals:
            return False
        delay = self.max_prefill_delay_steps
        if not self.running or delay == 0 or steps_since_prefill >= delay:
            return True
        return arrivals * delay >= len(self.running)

    def admit(
        self, *, background: bool = True, background_with_interactive: bool = True
    ) -> list[S]:
        """Move waiting sequences into the running batch while they fit and the prefill budget
        lasts (one is always taken when it fits): interactive ones in arrival order, then, if
        none is left waiting and `background` allows, background ones in theirs (with
        `background_with_interactive` false, only when no interactive one was taken). They are
        the caller's to prefill. Cancelled waiting sequences are dropped on the way."""
        self._drop_cancelled()
        taken: list[S] = []
        self._take(self.waiting, taken, background=False)
        if taken and not background_with_interactive:
            background = False
        if background and not self.waiting:
            self._take(self.waiting_background, taken, background=True)
        return taken

    def _take(self, queue: deque[S], taken: list[S], *, background: bool) -> None:
        """Admit from the head of `queue` into the running batch (and `taken`) while they fit
        and the prefill budget, shared by everything `taken` this iteration, lasts."""
        prefill = sum(s.prompt_tokens for s in taken)
        for _ in range(self.fitting(queue, background=background)):
            head = queue[0]
            if taken and prefill + head.prompt_tokens > self.max_prefill_tokens:
                break
            taken.append(queue.popleft())
            self.running.append(head)
            prefill += head.prompt_tokens

    def release(self, sequences: Iterable[S]) -> None:
        """Sequences that left the running batch (finished, failed or cancelled)."""
        gone = {id(s) for s in sequences}
        if gone:
            self.running = [s for s in self.running if id(s) not in gone]

    def retry_after_s(self, tokens_per_s: float, *, background: bool = False) -> int:
        """Seconds until the work queued ahead of a sequence of this class has likely drained:
        its tokens at the recent rate (interactive sequences never wait behind background)."""
        if tokens_per_s <= 0:
            return 1
        ahead = [*self.waiting, *self.waiting_background] if background else self.waiting
        queued = sum(s.max_tokens for s in ahead)
        return max(1, min(RETRY_AFTER_MAX_S, math.ceil(queued / tokens_per_s)))
