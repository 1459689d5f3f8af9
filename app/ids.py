"""Random, prefixed ids for responses and cached replays (e.g. 'chatcmpl-<hex>')."""

from __future__ import annotations

import uuid


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
