"""What each simulated user sends: the next request of the mix, and the tally of a stream's
server-sent events (time to first token, gaps between tokens, an in-band error)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

from app.loadtest.config import LoadTestConfig, RequestKind

PATHS = {
    RequestKind.CHAT: "/chat/completions",
    RequestKind.STREAM: "/chat/completions",
    RequestKind.COMPLETION: "/completions",
    RequestKind.EMBEDDING: "/embeddings",
}

_WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven",
    "wizards", "quietly", "judge", "boxing", "matches", "under", "pale", "moonlight", "near",
)  # fmt: skip


@dataclass(frozen=True)
class PlannedRequest:
    kind: RequestKind
    path: str
    body: dict[str, Any]


class Workload:
    """Draws requests from the mix and the length distributions with one seeded generator."""

    def __init__(
        self, config: LoadTestConfig, models: dict[RequestKind, str], rng: random.Random
    ) -> None:
        weights = config.mix.weights()
        self.kinds = [kind for kind in config.mix.kinds() if kind in models]
        self.weights = [weights[kind] for kind in self.kinds]
        if not self.kinds:
            raise ValueError("no kind of the mix has a model")
        self.config = config
        self.models = models
        self.rng = rng

    def next(self) -> PlannedRequest:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        prompt = prompt_text(self.rng, self.config.prompt_tokens.sample(self.rng))
        max_tokens = self.config.output_tokens.sample(self.rng)
        return PlannedRequest(kind, PATHS[kind], body(kind, self.models[kind], prompt, max_tokens))


def prompt_text(rng: random.Random, tokens: int) -> str:
    """About `tokens` words. The first is random, so no response cache answers a repeat."""
    words = [f"r{rng.getrandbits(48):x}"]
    words += rng.choices(_WORDS, k=max(0, tokens - 1))
    return " ".join(words)


def body(kind: RequestKind, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    if kind is RequestKind.EMBEDDING:
        return {"model": model, "input": prompt}
    if kind is RequestKind.COMPLETION:
        return {"model": model, "prompt": prompt, "max_tokens": max_tokens}
    request: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
    }
    if kind is RequestKind.STREAM:
        request["stream"] = True
        request["stream_options"] = {"include_usage": True}
    return request


@dataclass
class StreamTally:
    """Feeds on a stream's lines as they arrive (times in seconds from the request's start).
    A token is an event carrying text; events joined in one network read arrive together, so
    the gaps are what a client sees, not what the server's clock says."""

    first_token_s: float | None = None
    last_token_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    tokens: int = 0
    usage_tokens: int | None = None
    error: str | None = None
    done: bool = False

    def feed(self, line: bytes, at_s: float) -> None:
        line = line.strip()
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            event = json.loads(payload)
        except ValueError:
            self.error = "unparsable event"
            return
        if not isinstance(event, dict):
            return
        if event.get("error"):
            error = event["error"]
            self.error = str(error.get("message", error) if isinstance(error, dict) else error)
            return
        usage = event.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.usage_tokens = usage["completion_tokens"]
        if _has_text(event):
            self._token(at_s)

    def _token(self, at_s: float) -> None:
        if self.first_token_s is None:
            self.first_token_s = at_s
        elif self.last_token_s is not None:
            self.gaps_s.append(at_s - self.last_token_s)
        self.last_token_s = at_s
        self.tokens += 1

    @property
    def output_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.tokens


def _has_text(event: dict[str, Any]) -> bool:
    for choice in event.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or choice.get("text"):
            return True
    return False


def usage_tokens(response: dict[str, Any]) -> int | None:
    usage = response.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        return int(usage["completion_tokens"])
    return None
