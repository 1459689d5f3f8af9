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
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stop for stop in stops if stop)
        self.emitted = 0  # characters of the completion text already released
        self.stopped = False

    def feed(self, text: str, final: bool = False) -> str:
        """New text to release given the whole completion so far; sets `stopped` on a match.

        `final` releases everything still held back (the completion ends here for another
        reason, such as max_tokens), unless it contains a stop sequence.
        """
        if self.stopped:
            return ""
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            return self._release(text, cut)
        safe = len(text) if final else len(text) - self._partial_suffix(text)
        return self._release(text, safe)

    def _release(self, text: str, end: int) -> str:
        end = max(end, self.emitted)
        piece = text[self.emitted : end]
        self.emitted = end
        return piece

    def _first_stop(self, text: str) -> int | None:
        # A stop cannot begin inside text released earlier (it would have been held back), so
        # searching from there keeps each step's scan short.
        start = max(0, self.emitted - max((len(s) for s in self.stops), default=0))
        found = [i for i in (text.find(stop, start) for stop in self.stops) if i >= 0]
        return min(found) if found else None

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper prefix of some stop sequence."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
