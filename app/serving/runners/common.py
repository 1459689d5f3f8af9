"""Helpers the runners share: choosing a torch dtype for a card and holding back stop sequences."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from app.catalog.cards import Dtype

if TYPE_CHECKING:
    import torch


def torch_dtype(dtype: Dtype, device: str) -> torch.dtype:
    """The torch dtype to load weights in: auto is float32 on CPU and a half type on CUDA.

    Half types asked for on a CPU fall back to float32, because many CPU kernels lack them or
    run them far slower than float32.
    """
    import torch

    on_cuda = device.startswith("cuda")
    if dtype is Dtype.AUTO:
        if not on_cuda:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype is Dtype.FLOAT32 or not on_cuda:
        return torch.float32
    return torch.bfloat16 if dtype is Dtype.BFLOAT16 else torch.float16


def transformers_dtype_arg() -> str:
    """from_pretrained's dtype keyword: transformers 4.56 renamed torch_dtype to dtype."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def count_parameters(*modules: Any) -> int:
    """Parameters across torch modules (None entries are skipped)."""
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


class StopScanner:
    """Turns a growing completion text into safe-to-emit pieces, cutting at the first stop sequence.

    Text that could still become the start of a stop sequence is held back until it either
    completes the stop (and is dropped) or stops matching (and is released), so the client never
    sees any part of a stop sequence.

    Each feed scans only the tail that can hold a new match: the held-back text, the new text and
    a margin of the longest stop's length before them. With one prefix-function (KMP) pass per
    stop over that window, a step costs O(len(window)) whatever the stops look like, so a long
    stop sequence no longer makes every token quadratic in its length.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stop for stop in stops if stop)
        self._borders = [_borders(stop) for stop in self.stops]
        self._longest = max((len(s) for s in self.stops), default=0)
        self.emitted = 0  # characters of the completion text already released
        self.stopped = False

    def feed(self, text: str, final: bool = False) -> str:
        """New text to release given the whole completion so far; sets `stopped` on a match.

        `final` releases everything still held back (the completion ends here for another
        reason, such as max_tokens), unless it contains a stop sequence.
        """
        if self.stopped:
            return ""
        if not self.stops:
            return self._release(text, len(text))
        # A stop cannot begin inside text released earlier (it would have been held back); the
        # margin keeps a match found even if a tokenizer re-decodes the last released characters.
        start = max(0, self.emitted - self._longest)
        cut, partial = self._scan(text[start:])
        if cut is not None:
            self.stopped = True
            return self._release(text, start + cut)
        safe = len(text) if final else len(text) - partial
        return self._release(text, safe)

    def _release(self, text: str, end: int) -> str:
        end = max(end, self.emitted)
        piece = text[self.emitted : end]
        self.emitted = end
        return piece

    def _scan(self, window: str) -> tuple[int | None, int]:
        """(where the first stop starts in window or None, the longest end of window that is a
        proper prefix of some stop)."""
        first: int | None = None
        partial = 0
        for stop, borders in zip(self.stops, self._borders, strict=True):
            matched = 0  # length of the longest prefix of stop ending at the current character
            for index, char in enumerate(window):
                while matched and stop[matched] != char:
                    matched = borders[matched - 1]
                if stop[matched] == char:
                    matched += 1
                if matched == len(stop):
                    begin = index + 1 - len(stop)
                    first = begin if first is None else min(first, begin)
                    break
            else:
                partial = max(partial, matched)
        return first, partial


def _borders(pattern: str) -> list[int]:
    """KMP's prefix function: for each prefix, the longest proper prefix that is also its suffix."""
    borders = [0] * len(pattern)
    length = 0
    for index in range(1, len(pattern)):
        while length and pattern[index] != pattern[length]:
            length = borders[length - 1]
        if pattern[index] == pattern[length]:
            length += 1
        borders[index] = length
    return borders
