"""The transformers causal-LM runner: batched incremental decoding with a KV cache.

`generate` decodes one batch in lock step (the static engine). The continuous engine
(app.serving.engines) drives the same pieces, `prepare`, `start_batch` and the DecodeBatch it
returns, one iteration at a time. Either way rows leave the batch as they finish, fail or are
cancelled: their KV cache rows are dropped, so the rest decodes at its own size and an abandoned
request costs nothing further.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from app.catalog.cards import ModelCard
from app.serving.runners.base import (
    GenerationRequest,
    LoadedInfo,
    RowError,
    StepEntry,
    TextGenerationRunner,
)
from app.serving.runners.common import (
    count_parameters,
    torch_dtype,
    transformers_dtype_arg,
)
from app.serving.runners.text_batch import DecodeBatch, Row

if TYPE_CHECKING:
    import torch

# Prompt tokens decoded in front of the completion so tokenizers that drop a word's leading space
# at the start of a decode (SentencePiece) still produce it for the first generated word.
_PROMPT_TAIL = 4


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
        return self._decode_batch([self.prepare(request) for request in batch])

    def prepare(self, request: GenerationRequest) -> tuple[Row, list[int]] | RowError:
        """A request's decode row and prompt ids, or the RowError it alone fails with (a
        ValueError naming the limit for a prompt that does not fit)."""
        try:
            ids = self._checked_prompt(request)
            row = Row(
                request,
                ids[-_PROMPT_TAIL:],
                self._generator(request.seed),
                self._decode,
                prompt_tokens=len(ids),
            )
        except Exception as exc:  # this request alone is bad: its prompt, its seed
            return RowError(exc)
        return row, ids

    def start_batch(self, rows: list[Row], prompts: list[list[int]]) -> DecodeBatch:
        """A batch of prepared rows; its first step is their prefill."""
        if self.model is None:
            raise RuntimeError("load() must run before start_batch()")
        return DecodeBatch.start(
            self._forward, frozenset(self.eos_ids), self.pad_id, rows, prompts, self.device
        )

    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one position of one sequence takes: keys and values in every layer."""
        config = self.model.config.get_text_config()
        heads = getattr(config, "num_attention_heads", 1)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        element = next(self.model.parameters()).element_size()
        return 2 * config.num_hidden_layers * kv_heads * head_dim * element

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
        self, prepared: list[tuple[Row, list[int]] | RowError]
    ) -> Iterator[list[StepEntry]]:
        step: list[StepEntry] = [p if isinstance(p, RowError) else None for p in prepared]
        slots = [i for i, p in enumerate(prepared) if not isinstance(p, RowError)]
        rows = [p[0] for p in prepared if not isinstance(p, RowError)]
        prompts = [p[1] for p in prepared if not isinstance(p, RowError)]
        batch = self.start_batch(rows, prompts) if rows else None
        while True:
            keep = [k for k, row in enumerate(batch.rows) if row.live] if batch else []
            if batch is None or not keep:
                if any(entry is not None for entry in step):
                    yield step  # failures not delivered yet
                return
            if batch.keep(keep):
                slots = [slots[k] for k in keep]
            for slot, entry in zip(slots, batch.step(), strict=True):
                step[slot] = entry
            yield step
            step = [None] * len(prepared)

    def _generator(self, seed: int | None) -> torch.Generator | None:
        import torch

        if seed is None:
            return None  # the global RNG
        return torch.Generator(device=self.device).manual_seed(seed)

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
