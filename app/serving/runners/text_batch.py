"""Sequences decoding together on a causal LM: their rows, KV cache and next inputs.

A `DecodeBatch` keeps every row right-aligned: prompts are left-padded, so each row's next token
sits in the last column, positions count real tokens only and the attention mask hides the pads.
Both engines decode through it:

- the static engine starts one batch and steps it until its rows are done;
- the continuous engine prefills arrivals as a batch of their own and `absorb`s it into the
  running one between decode steps, left-padding whichever side is narrower.

Rows that finish, fail or are cancelled are dropped (`keep`) with their KV cache rows, and
columns no remaining row uses any more are trimmed from the left (`trim`), so the cache is as
wide as the longest live context, not the longest the batch has ever seen.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.serving.runners.base import GenerationRequest, RowError, StepEntry, TokenDelta
from app.serving.runners.common import StopScanner

if TYPE_CHECKING:
    import torch

# One forward pass: (input_ids, attention_mask, position_ids, cache) -> (last logits, cache).
Forward = Callable[[Any, Any, Any, Any], tuple[Any, Any]]

_REPLACEMENT = "\ufffd"  # what a decode shows for an incomplete multi-byte character


class UnmergeableCache(TypeError):
    """The model's KV cache cannot be cut or joined row-wise (a sliding-window, static or
    quantised cache), so it cannot decode in a continuous batch."""


@dataclass
class Row:
    """Decode state of one request.

    Text is detokenised incrementally, as vLLM and TGI do: each step decodes only a short
    window (the tokens since the last committed text, plus the few before them for context),
    so a step costs the same at token 5 and token 5,000. The window starts in the prompt's
    tail, so tokenizers that drop a word's leading space at the start of a decode
    (SentencePiece) still produce it for the first generated word.
    """

    request: GenerationRequest
    prompt_tail: list[int]
    generator: torch.Generator | None
    decode: Callable[[list[int]], str]
    prompt_tokens: int = 0
    scanner: StopScanner = field(init=False)
    generated: int = 0
    pending: int = 0  # tokens generated since this row's last delta
    done: bool = False
    error: Exception | None = None  # set when this row alone failed (e.g. while sampling)
    text: str = ""  # the completion's committed text
    _tokens: list[int] = field(init=False)  # the prompt tail, then every generated token
    _prefix_offset: int = 0  # where the decode window starts (context before the new tokens)
    _read_offset: int = field(init=False)  # tokens before this are in `text`
    _prefix_text: str = field(init=False)  # decode(_tokens[_prefix_offset:_read_offset])

    def __post_init__(self) -> None:
        self.scanner = StopScanner(self.request.stop)
        self._tokens = list(self.prompt_tail)
        self._read_offset = len(self._tokens)
        self._prefix_text = self.decode(self._tokens)

    @property
    def live(self) -> bool:
        """Still decoding: not finished, failed or cancelled."""
        return not self.done and not self.request.cancel.is_set()

    @property
    def reservation(self) -> int:
        """KV cache positions this row may come to hold: its prompt and every token it may add."""
        return self.prompt_tokens + self.request.max_tokens

    def advance(self, token: int, is_eos: bool) -> StepEntry:
        """Take one generated token; the delta (or this row's error) to send for it, if any."""
        if self.done:
            return None
        if self.error is not None:
            self.done = True
            return RowError(self.error)
        self.generated += 1
        self.pending += 1
        if not is_eos:
            self._tokens.append(token)
        at_length = self.generated >= self.request.max_tokens
        final = is_eos or at_length
        text = self._detokenize(final)
        piece = self.scanner.feed(text, final=final)
        reason = "stop" if self.scanner.stopped or is_eos else "length" if at_length else None
        if reason is None and not piece:
            return None
        delta = TokenDelta(piece, self.pending, reason)
        self.pending = 0
        self.done = reason is not None
        return delta

    def _detokenize(self, final: bool) -> str:
        """The completion so far. A trailing incomplete character (a multi-byte character split
        across tokens decodes as U+FFFD) is held back until its remaining bytes arrive, unless
        the completion ends here."""
        window = self.decode(self._tokens[self._prefix_offset :])
        if len(window) > len(self._prefix_text) and (final or not window.endswith(_REPLACEMENT)):
            self.text += window[len(self._prefix_text) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
            self._prefix_text = self.decode(self._tokens[self._prefix_offset : self._read_offset])
        return self.text


@dataclass
class DecodeBatch:
    """Rows decoding together; `step` runs one forward pass for all of them."""

    forward: Forward
    eos_ids: frozenset[int]
    pad_id: int
    rows: list[Row]
    input_ids: torch.Tensor  # [rows, q]: the prompts before the first step, then one token
    attention_mask: torch.Tensor  # [rows, cache width + q]
    position_ids: torch.Tensor  # [rows, q]
    past: Any = None
    # Rows of a cache that cannot be cut stay in the batch once done, decoding pad tokens.
    _stuck: bool = False

    @classmethod
    def start(
        cls,
        forward: Forward,
        eos_ids: frozenset[int],
        pad_id: int,
        rows: list[Row],
        prompts: list[list[int]],
        device: str,
    ) -> DecodeBatch:
        """A batch of fresh rows, its prompts right-aligned; its first step is their prefill."""
        import torch

        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[i, width - len(prompt) :] = 1
        # Positions count real tokens only, so a padded row sees the positions it would alone.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return cls(
            forward,
            eos_ids,
            pad_id,
            rows,
            input_ids.to(device),
            attention_mask.to(device),
            position_ids.to(device),
        )

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        """KV cache positions each row holds (real and padding) once the next step has run."""
        return int(self.attention_mask.shape[1])

    def step(self) -> list[StepEntry]:
        """One forward pass: every row's entry for it, in row order."""
        import torch

        # Inference mode per step, not around a caller's loop: it is thread-local state and must
        # not leak into the caller between steps.
        with torch.inference_mode():
            logits, self.past = self.forward(
                self.input_ids, self.attention_mask, self.position_ids, self.past
            )
            tokens = next_tokens(logits, self.rows)
        entries = [
            row.advance(token, token in self.eos_ids)
            for row, token in zip(self.rows, tokens, strict=True)
        ]
        # The next step's inputs: each row's new token, one more mask column, next positions.
        # Rows that stay in the batch once done (see keep) decode a pad token.
        fed = [self.pad_id if row.done else t for row, t in zip(self.rows, tokens, strict=True)]
        self.input_ids = torch.tensor(fed, device=self.input_ids.device).unsqueeze(1)
        self.attention_mask = torch.cat(
            [self.attention_mask, self.attention_mask.new_ones(len(self.rows), 1)], 1
        )
        self.position_ids = self.position_ids[:, -1:] + 1
        return entries

    def keep(self, indices: list[int]) -> bool:
        """Only the rows at `indices`, with their KV cache rows; False (and every row kept,
        the finished ones decoding pad tokens) for a cache that cannot be cut."""
        import torch

        if len(indices) == len(self.rows):
            return True
        if self._stuck:
            return False
        index = torch.tensor(indices, device=self.input_ids.device, dtype=torch.long)
        if self.past is not None:  # before the prefill there is no cache to cut
            try:
                self.past = _select_rows(self.past, index)
            except UnmergeableCache:
                self._stuck = True
                for row in self.rows:
                    row.done = not row.live
                return False
        self.rows = [self.rows[i] for i in indices]
        self.input_ids = self.input_ids[index]
        self.attention_mask = self.attention_mask[index]
        self.position_ids = self.position_ids[index]
        self.trim()
        return True

    def split(self, indices: list[int]) -> DecodeBatch | None:
        """Move the rows at `indices`, with their KV cache rows, into a batch of their own,
        which `absorb` joins back later; both must have stepped. None (and nothing moved) for
        a cache that cannot be cut."""
        moved = set(indices)
        rest = [i for i in range(len(self.rows)) if i not in moved]
        if self._stuck or self.past is None or not moved or not rest:
            return None
        import torch

        index = torch.tensor(indices, device=self.input_ids.device, dtype=torch.long)
        try:
            past = _select_rows(_copy_cache(self.past), index)
        except UnmergeableCache:
            return None
        other = DecodeBatch(
            self.forward,
            self.eos_ids,
            self.pad_id,
            [self.rows[i] for i in indices],
            self.input_ids[index],
            self.attention_mask[index],
            self.position_ids[index],
            past,
        )
        other.trim()
        self.keep(rest)
        return other

    def trim(self) -> None:
        """Drop leading columns that no row attends to any more: cache columns once the
        batch has stepped, padding of the prompts before its prefill."""
        if not self.rows:
            return
        used = self.attention_mask.any(dim=0)
        first = int(used.to(dtype=self.attention_mask.dtype).argmax())
        if self.past is None:
            if first > 0:
                self.input_ids = self.input_ids[:, first:]
                self.attention_mask = self.attention_mask[:, first:]
                self.position_ids = self.position_ids[:, first:]
            return
        unused = min(first, self.width - self.input_ids.shape[1])
        if unused > 0:
            self.past = _slice_columns(self.past, unused)
            self.attention_mask = self.attention_mask[:, unused:]

    def absorb(self, other: DecodeBatch) -> None:
        """Take `other`'s rows into this batch; both must have stepped at least once (their next
        inputs are one token per row). The narrower side's cache and mask are left-padded."""
        import torch

        if self.past is None or other.past is None:
            raise ValueError("absorb joins batches that have each run their prefill step")
        mine, theirs = self.width, other.width
        wide = max(mine, theirs)
        self.past = _join(self.past, other.past, wide - mine, wide - theirs)
        masks = [_pad_left(self.attention_mask, wide - mine)]
        masks.append(_pad_left(other.attention_mask, wide - theirs))
        self.attention_mask = torch.cat(masks)
        self.input_ids = torch.cat([self.input_ids, other.input_ids])
        self.position_ids = torch.cat([self.position_ids, other.position_ids])
        self.rows = self.rows + other.rows


def next_tokens(logits: torch.Tensor, rows: list[Row]) -> list[int]:
    """Greedy for temperature 0, else temperature plus top-p sampling with the row's RNG."""
    import torch

    chosen = logits.argmax(dim=-1)
    sampled = [i for i, row in enumerate(rows) if not row.done and row.request.temperature > 0]
    if sampled:
        pick = torch.tensor(sampled, device=logits.device)
        temperature = logits.new_tensor([rows[i].request.temperature for i in sampled])
        top_p = logits.new_tensor([rows[i].request.top_p for i in sampled])
        probs = _nucleus(torch.softmax(logits[pick] / temperature[:, None], dim=-1), top_p)
        for j, i in enumerate(sampled):
            try:
                chosen[i] = torch.multinomial(probs[j], 1, generator=rows[i].generator)[0]
            except RuntimeError as exc:  # e.g. non-finite probabilities in this row alone
                rows[i].error = exc
    tokens: list[int] = chosen.tolist()
    return tokens


def _nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches top_p (per row)."""
    import torch

    ordered, order = probs.sort(dim=-1, descending=True)
    # Probability mass ranked above each token: a token is kept while that is below top_p.
    before = ordered.cumsum(dim=-1) - ordered
    drop = before >= top_p[:, None]
    drop[:, 0] = False  # the most likely token survives even top_p=0
    ordered = ordered.masked_fill(drop, 0.0)
    return torch.zeros_like(ordered).scatter(-1, order, ordered)


# --- KV cache surgery -----------------------------------------------------------------------
# transformers' Cache classes can select rows (batch_select_indices) but not join two caches or
# drop leading columns, so these work on their layers' tensors directly. Only the plain dynamic
# layer is handled: a sliding-window layer keeps a rolling window whose columns do not line up
# across rows, and static or quantised layers keep their own storage.


def _layers(cache: Any) -> list[Any]:
    """The cache's dynamic layers (each with .keys and .values [rows, heads, width, dim])."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer) is not DynamicLayer for layer in layers):
        raise UnmergeableCache(f"{type(cache).__name__} is not a cache of plain dynamic layers")
    return [layer for layer in layers if getattr(layer, "is_initialized", True)]


def _copy_cache(cache: Any) -> Any:
    """A cache whose layers can be cut without touching `cache`'s (they share tensors until
    then: _select_rows and _join assign new ones)."""
    if isinstance(cache, tuple):  # immutable: cutting it builds new tuples
        return cache
    _layers(cache)  # raises UnmergeableCache for any other kind of layer
    copied = copy.copy(cache)
    copied.layers = [copy.copy(layer) for layer in cache.layers]
    return copied


def _select_rows(cache: Any, index: torch.Tensor) -> Any:
    if isinstance(cache, tuple):  # the legacy per-layer (key, value) tuples
        return tuple(tuple(tensor[index] for tensor in layer) for layer in cache)
    for layer in _layers(cache):
        layer.keys, layer.values = layer.keys[index], layer.values[index]
    return cache


def _slice_columns(cache: Any, start: int) -> Any:
    if isinstance(cache, tuple):
        return tuple(tuple(tensor[..., start:, :] for tensor in layer) for layer in cache)
    for layer in _layers(cache):
        layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
    return cache


def _join(mine: Any, theirs: Any, pad_mine: int, pad_theirs: int) -> Any:
    import torch

    def joined(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([_pad_columns(a, pad_mine), _pad_columns(b, pad_theirs)])

    if isinstance(mine, tuple) and isinstance(theirs, tuple):
        return tuple(
            tuple(joined(a, b) for a, b in zip(x, y, strict=True))
            for x, y in zip(mine, theirs, strict=True)
        )
    ours, other = _layers(mine), _layers(theirs)
    if len(ours) != len(other):
        raise UnmergeableCache("the two caches have different numbers of layers")
    for a, b in zip(ours, other, strict=True):
        a.keys, a.values = joined(a.keys, b.keys), joined(a.values, b.values)
    return mine


def _pad_columns(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """`count` zero columns before the sequence axis (-2) of a [rows, heads, width, dim] tensor."""
    import torch

    if count == 0:
        return tensor
    shape = list(tensor.shape)
    shape[-2] = count
    return torch.cat([tensor.new_zeros(shape), tensor], dim=-2)


def _pad_left(mask: torch.Tensor, count: int) -> torch.Tensor:
    import torch

    if count == 0:
        return mask
    return torch.cat([mask.new_zeros(mask.shape[0], count), mask], dim=1)
