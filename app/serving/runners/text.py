"""The transformers causal-LM runner: batched incremental decoding with a KV cache.

Rows leave the batch as they finish, fail or are cancelled: their KV cache rows are dropped, so
the rest of the batch decodes at its own size and an abandoned request costs nothing further.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.catalog.cards import ModelCard
from app.serving.runners.base import (
    GenerationRequest,
    LoadedInfo,
    RowError,
    StepEntry,
    TextGenerationRunner,
    TokenDelta,
)
from app.serving.runners.common import (
    StopScanner,
    count_parameters,
    torch_dtype,
    transformers_dtype_arg,
)

if TYPE_CHECKING:
    import torch

# Prompt tokens decoded in front of the completion so tokenizers that drop a word's leading space
# at the start of a decode (SentencePiece) still produce it for the first generated word.
_PROMPT_TAIL = 4
_REPLACEMENT = "\ufffd"  # what a decode shows for an incomplete multi-byte character


@dataclass
class _Row:
    """Decode state of one request in a batch."""

    request: GenerationRequest
    prompt_tail: list[int]
    generator: torch.Generator | None
    decode: Callable[[list[int]], str]
    scanner: StopScanner = field(init=False)
    prefix: str = field(init=False)  # the prompt tail's own text, cut off each decode
    ids: list[int] = field(default_factory=list)
    generated: int = 0
    pending: int = 0  # tokens generated since this row's last delta
    done: bool = False
    error: Exception | None = None  # set when this row alone failed (e.g. while sampling)

    def __post_init__(self) -> None:
        self.scanner = StopScanner(self.request.stop)
        self.prefix = self.decode(self.prompt_tail)

    @property
    def live(self) -> bool:
        """Still decoding: not finished, failed or cancelled."""
        return not self.done and not self.request.cancel.is_set()

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
            self.ids.append(token)
        at_length = self.generated >= self.request.max_tokens
        final = is_eos or at_length
        text = self._text()
        # Hold back a trailing incomplete character until its remaining bytes arrive.
        piece = self.scanner.feed(text if final else text.rstrip(_REPLACEMENT), final=final)
        reason = "stop" if self.scanner.stopped or is_eos else "length" if at_length else None
        if reason is None and not piece:
            return None
        delta = TokenDelta(piece, self.pending, reason)
        self.pending = 0
        self.done = reason is not None
        return delta

    def _text(self) -> str:
        """The completion so far, decoded whole so characters split across tokens come out right."""
        text = self.decode(self.prompt_tail + self.ids)
        return text[len(self.prefix) :] if text.startswith(self.prefix) else self.decode(self.ids)


class TransformersCausalLMRunner(TextGenerationRunner, loader="transformers-causal-lm"):
    """Any AutoModelForCausalLM (hub id or local directory), decoding a batch in lock step.

    One runner serves one batch at a time; the replica serialises calls into it.
    """

    def __init__(self, card: ModelCard, source: str | None, device: str = "cpu") -> None:
        super().__init__(card, source, device)
        self.model: Any = None
        self.tokenizer: Any = None
        self.eos_ids: set[int] = set()
        self.pad_id = 0
        self._keep_last_logits = False
        self._cache_name = "past_key_values"

    def load(self) -> LoadedInfo:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.source is None:
            raise ValueError(f"model {self.card.id!r} has no source to load")
        dtype = torch_dtype(self.card.dtype, self.device)
        revision = self.card.revision
        self.tokenizer = AutoTokenizer.from_pretrained(self.source, revision=revision)
        model: Any = AutoModelForCausalLM.from_pretrained(
            self.source, revision=revision, **{transformers_dtype_arg(): dtype}
        )
        self.model = model.to(self.device).eval()
        self.eos_ids = self._eos_ids()
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids, default=0)
        parameters = inspect.signature(model.forward).parameters
        self._keep_last_logits = "logits_to_keep" in parameters
        # transformers 5.x renamed the KV cache argument and output field past_key_values to cache.
        self._cache_name = "cache" if "cache" in parameters else "past_key_values"
        return LoadedInfo(
            device=self.device,
            dtype=str(dtype).removeprefix("torch."),
            parameters=count_parameters(self.model),
            extra={
                "vocab_size": len(self.tokenizer),
                "chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
                "max_context_tokens": self.card.generation.max_context_tokens,
            },
        )

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        for value in (configured, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(int(v) for v in value)
        return ids

    def _encode(self, text: str) -> list[int]:
        # A chat template usually writes the BOS token itself; adding another would double it.
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        ids: list[int] = self.tokenizer(text, add_special_tokens=add_special)["input_ids"]
        return ids

    def _decode(self, ids: list[int]) -> str:
        text: str = self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return text

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text))

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        """The tokenizer's chat template, or a plain 'role: content' transcript without one."""
        if getattr(self.tokenizer, "chat_template", None):
            from jinja2 import TemplateError

            try:
                prompt: str = self.tokenizer.apply_chat_template(
                    [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
                )
            except TemplateError as exc:  # e.g. a template that rejects a role order
                raise ValueError(f"chat template rejected the messages: {exc}") from exc
            return prompt
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join([*lines, "assistant:"])

    def generate(self, batch: Sequence[GenerationRequest]) -> Iterator[list[StepEntry]]:
        """Validate and tokenize now, then decode lazily; a request that fails validation (a
        ValueError naming the limit) is a RowError in the first step and its neighbours go on."""
        if self.model is None:
            raise RuntimeError("load() must run before generate()")
        if not batch:
            return iter(())
        return self._decode_batch([self._prepare(request) for request in batch])

    def _prepare(self, request: GenerationRequest) -> tuple[_Row, list[int]] | RowError:
        try:
            ids = self._checked_prompt(request)
            row = _Row(request, ids[-_PROMPT_TAIL:], self._generator(request.seed), self._decode)
        except Exception as exc:  # this request alone is bad: its prompt, its seed
            return RowError(exc)
        return row, ids

    def _checked_prompt(self, request: GenerationRequest) -> list[int]:
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {request.max_tokens}")
        ids = self._encode(request.prompt)
        if not ids:
            raise ValueError("the prompt is empty and this tokenizer adds no BOS token")
        context = self.card.generation.max_context_tokens
        allowed = context - request.max_tokens
        if len(ids) > allowed:
            raise ValueError(
                f"prompt has {len(ids)} tokens but model {self.card.id!r} allows at most "
                f"{max(allowed, 0)} with max_tokens={request.max_tokens} "
                f"(max_context_tokens={context} covers prompt plus completion)"
            )
        return ids

    def _decode_batch(
        self, prepared: list[tuple[_Row, list[int]] | RowError]
    ) -> Iterator[list[StepEntry]]:
        import torch

        step: list[StepEntry] = [p if isinstance(p, RowError) else None for p in prepared]
        slots = [i for i, p in enumerate(prepared) if not isinstance(p, RowError)]
        rows = [p[0] for p in prepared if not isinstance(p, RowError)]
        prompts = [p[1] for p in prepared if not isinstance(p, RowError)]
        tensors = self._left_pad(prompts) if prompts else None
        past: Any = None
        while True:
            keep = [k for k, row in enumerate(rows) if row.live]
            if tensors is None or not keep:
                if any(entry is not None for entry in step):
                    yield step  # failures not delivered yet
                return
            if len(keep) < len(rows):
                cut = self._cut_rows(keep, tensors, past)
                if cut is None:  # they stay, decoding pad tokens
                    for row in rows:
                        row.done = not row.live
                else:
                    tensors, past = cut
                    slots = [slots[k] for k in keep]
                    rows = [rows[k] for k in keep]
            input_ids, attention_mask, position_ids = tensors
            # Inference mode per step, not around the yield: it is thread-local state and must
            # not leak into the caller between steps.
            with torch.inference_mode():
                logits, past = self._forward(input_ids, attention_mask, position_ids, past)
                tokens = self._next_tokens(logits, rows)
            for slot, row, token in zip(slots, rows, tokens, strict=True):
                step[slot] = row.advance(token, token in self.eos_ids)
            yield step
            step = [None] * len(prepared)
            tensors = self._next_inputs(rows, tokens, attention_mask, position_ids)

    def _next_inputs(
        self,
        rows: list[_Row],
        tokens: list[int],
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """The next step's inputs: each row's new token, one more mask column, next positions."""
        import torch

        # Rows that stayed in the batch (see _cut_rows) decode a pad token once done.
        fed = [self.pad_id if row.done else t for row, t in zip(rows, tokens, strict=True)]
        return (
            torch.tensor(fed, device=self.device).unsqueeze(1),
            torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], 1),
            position_ids[:, -1:] + 1,
        )

    def _cut_rows(
        self, keep: list[int], tensors: tuple[torch.Tensor, ...], past: Any
    ) -> tuple[tuple[torch.Tensor, ...], Any] | None:
        """Only the `keep` rows of the batch and its KV cache; None for a cache we cannot cut."""
        import torch

        index = torch.tensor(keep, device=self.device)
        if past is None:
            cache: Any = None
        elif hasattr(past, "batch_select_indices"):  # transformers' Cache classes
            past.batch_select_indices(index)
            cache = past
        elif isinstance(past, tuple):  # the legacy per-layer (key, value) tuples
            cache = tuple(tuple(tensor[index] for tensor in layer) for layer in past)
        else:
            return None
        return tuple(tensor[index] for tensor in tensors), cache

    def _generator(self, seed: int | None) -> torch.Generator | None:
        import torch

        if seed is None:
            return None  # the global RNG
        return torch.Generator(device=self.device).manual_seed(seed)

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, ...]:
        """Right-align prompts so every row's next token lands in the last column."""
        import torch

        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[i, width - len(prompt) :] = 1
        # Positions count real tokens only, so a padded row sees the positions it would alone.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return (
            input_ids.to(self.device),
            attention_mask.to(self.device),
            position_ids.to(self.device),
        )

    def _forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: Any,
    ) -> tuple[torch.Tensor, Any]:
        extra: dict[str, Any] = {self._cache_name: past}
        if self._keep_last_logits:
            extra["logits_to_keep"] = 1
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **extra,
        )
        return out.logits[:, -1, :].float(), getattr(out, self._cache_name)

    def _next_tokens(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
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
