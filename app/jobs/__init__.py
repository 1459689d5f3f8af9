"""Durable jobs infrastructure: the work queue in the KV store that batch workers lease from."""

from __future__ import annotations

from app.jobs.queue import DurableQueue, Lease, QueueStats

__all__ = ["DurableQueue", "Lease", "QueueStats"]
