"""The event bus: typed events in a durable, ordered log in the KV store."""

from __future__ import annotations

from app.events.bus import ConsumerGroup, Event, EventBus, EventType
from app.events.follow import follow

__all__ = ["ConsumerGroup", "Event", "EventBus", "EventType", "follow"]
