"""The echo runner: text generation with no model compute, to measure the platform's overhead."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from app.serving.runners.base import (
    GenerationRequest,
    LoadedInfo,
    StepEntry,
    TextGenerationRunner,
    TokenDelta,
)
from app.serving.runners.common import StopScanner

# A token is a run of non-space characters with the whitespace that follows it, so joining the
# tokens gives back the text exactly.
_TOKEN = re.compile(r"\s*\S+\s*|\s+")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


class EchoRunner(TextGenerationRunner, loader="echo"):
    """Returns the prompt's tokens as the completion (the last message's content for chat)."""

    blocking = False

    def load(self) -> LoadedInfo:
        return LoadedInfo(device="cpu", dtype="none")

    def count_tokens(self, text: str) -> int:
        return len(tokenize(text))

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        return messages[-1]["content"] if messages else ""

    def generate(self, batch: Sequence[GenerationRequest]) -> Iterator[list[StepEntry]]:
        streams = [_echo(request) for request in batch]
        while True:
            # A stream yields None while it holds text back, so only exhaustion (or its
            # request's cancellation) ends it.
            step = [
                _END if request.cancel.is_set() else next(stream, _END)
                for request, stream in zip(batch, streams, strict=True)
            ]
            if all(delta is _END for delta in step):
                return
            yield [delta if isinstance(delta, TokenDelta) else None for delta in step]


_END = object()


def _echo(request: GenerationRequest) -> Iterator[TokenDelta | None]:
    all_tokens = tokenize(request.prompt)
    tokens = all_tokens[: request.max_tokens]
    if not tokens:
        yield TokenDelta("", 0, "stop")
        return
    scanner = StopScanner(request.stop)
    text, pending = "", 0
    for index, token in enumerate(tokens):
        text += token
        pending += 1
        last = index == len(tokens) - 1
        piece = scanner.feed(text, final=last)
        if scanner.stopped:
            yield TokenDelta(piece, pending, "stop")
            return
        if last:
            yield TokenDelta(piece, pending, "length" if len(all_tokens) > len(tokens) else "stop")
            return
        if piece:
            yield TokenDelta(piece, pending)
            pending = 0
        else:
            yield None
