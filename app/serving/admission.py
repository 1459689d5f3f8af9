"""Admission: a replica's slots (the card's max_ongoing_requests), one per sequence a request
decodes or image it draws, so a request of eight sequences weighs eight, not one.

The replica admits a request before it has parsed it (`admit`, one slot); the operation then
claims the rest once it knows how many sequences it runs (`hold`). The two meet through a
context variable, so the operation needs no handle on the admission that let its request in,
and an operation called with no admission around it (tests, in-process callers) admits itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass

from app.api.errors import OverloadedError


@dataclass
class _Ticket:
    """The slots one admitted request holds; closed when the request leaves."""

    owner: Admission
    slots: int
    open: bool = True
    background: bool = False  # batch work: bounded to the background share of the slots


_TICKET: ContextVar[_Ticket | None] = ContextVar("app_admission_ticket", default=None)


class Admission:
    """Counts the sequences in flight on one replica; beyond capacity a request gets a 429."""

    def __init__(self, model_id: str, capacity: int, background_share: float = 1.0) -> None:
        self.model_id = model_id
        self.capacity = capacity
        # Background (batch) work may fill the slots only while this share of them is in use,
        # so interactive requests always find the rest free.
        self.background_limit = max(1, int(capacity * background_share))
        self.inflight = 0

    @contextmanager
    def admit(self, slots: int = 1, *, background: bool = False) -> Iterator[None]:
        """Hold `slots` for the block: a request arriving (OverloadedError, a 429, when full;
        for background work, when the background share is in use)."""
        self._take(slots, background)
        ticket = _Ticket(self, slots, background=background)
        token = _TICKET.set(ticket)
        try:
            yield
        finally:
            ticket.open = False
            self.inflight -= ticket.slots
            # A stream closed from another task runs this in another context, where the
            # token does not apply; the ticket is closed either way.
            with suppress(ValueError, RuntimeError):
                _TICKET.reset(token)

    @contextmanager
    def hold(self, slots: int) -> Iterator[None]:
        """Make the current request hold `slots` in all for the block (its admission's slot
        counts towards them); with no admitted request around, admit one."""
        ticket = _TICKET.get()
        if ticket is None or not ticket.open or ticket.owner is not self:
            with self.admit(slots):
                yield
            return
        extra = max(slots - ticket.slots, 0)
        self._take(extra, ticket.background)
        ticket.slots += extra
        try:
            yield
        finally:
            if ticket.open:  # else the admission has already released them with its own
                ticket.slots -= extra
                self.inflight -= extra

    def background_now(self) -> bool:
        """Whether the request being served here (this context's ticket) is batch work."""
        ticket = _TICKET.get()
        return ticket is not None and ticket.open and ticket.owner is self and ticket.background

    def _take(self, slots: int, background: bool = False) -> None:
        limit = self.background_limit if background else self.capacity
        if slots and self.inflight + slots > limit:
            share = " (the share batch work may use)" if background else ""
            raise OverloadedError(
                f"model {self.model_id!r} is at capacity ({self.inflight} of {limit}{share} "
                f"sequences in flight; this request needs {slots} more); retry shortly",
                retry_after_s=1,
            )
        self.inflight += slots
