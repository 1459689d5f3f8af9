"""The sentence-transformers runner: unit-normalised sentence embeddings for a batch of texts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.catalog.cards import ModelCard
from app.serving.runners.base import EmbeddingRunner, LoadedInfo
from app.serving.runners.common import count_parameters, torch_dtype, transformers_dtype_arg


class SentenceTransformersRunner(EmbeddingRunner, loader="sentence-transformers"):
    """Any SentenceTransformer model (hub id or local directory).

    Inputs longer than max_input_tokens are truncated by sentence-transformers, so only their
    first max_input_tokens tokens shape the embedding; count_tokens still reports the full length.
    """

    def __init__(self, card: ModelCard, source: str | None, device: str = "cpu") -> None:
        super().__init__(card, source, device)
        self.model: Any = None

    def load(self) -> LoadedInfo:
        import torch
        from sentence_transformers import SentenceTransformer

        if self.source is None:
            raise ValueError(f"model {self.card.id!r} has no source to load")
        dtype = torch_dtype(self.card.dtype, self.device)
        # float32 is what sentence-transformers loads anyway; pass a dtype only to change it.
        model_kwargs = None if dtype == torch.float32 else {transformers_dtype_arg(): dtype}
        self.model = SentenceTransformer(
            self.source, device=self.device, revision=self.card.revision, model_kwargs=model_kwargs
        )
        self.model.eval()
        return LoadedInfo(
            device=self.device,
            dtype=str(dtype).removeprefix("torch."),
            parameters=count_parameters(self.model),
            extra={"dimensions": self.dimensions, "max_input_tokens": self.max_input_tokens},
        )

    @property
    def dimensions(self) -> int:
        # sentence-transformers 6 renamed get_sentence_embedding_dimension.
        getter = getattr(self.model, "get_embedding_dimension", None)
        size = (getter or self.model.get_sentence_embedding_dimension)()
        if size is None:
            raise RuntimeError(f"model {self.card.id!r} does not report its embedding size")
        return int(size)

    @property
    def max_input_tokens(self) -> int:
        return int(self.model.max_seq_length)

    def count_tokens(self, text: str) -> int:
        """Tokens in the text including the model's special tokens, before any truncation."""
        ids = self.model.tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
        return len(ids)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        vectors = self.model.encode(
            list(texts),
            batch_size=len(texts),
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        embeddings: list[list[float]] = vectors.astype("float32").tolist()
        return embeddings
