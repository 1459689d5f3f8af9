"""The real runners on freshly built tiny models, and the echo runner."""

from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from app.catalog.cards import ModelCard, load_catalogue
from app.catalog.recipes import build_card
from app.serving.runners import (
    GenerationCancelled,
    GenerationRequest,
    ImageRequest,
    RowError,
    TextGenerationRunner,
    TokenDelta,
    runner_class,
)
from app.serving.runners.common import StopScanner
from app.serving.runners.echo import EchoRunner
from app.serving.runners.embedding import SentenceTransformersRunner
from app.serving.runners.image import StableDiffusionRunner
from app.serving.runners.text import TransformersCausalLMRunner
from app.serving.runners.text_batch import Row

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
CATALOGUE = load_catalogue(MODELS_DIR)


def _card(model_id: str) -> ModelCard:
    card = CATALOGUE.get(model_id)
    assert card is not None
    return card


def _load(model_id: str, directory: Path) -> object:
    card = _card(model_id)
    source = build_card(card, directory)
    runner = runner_class(card.loader)(card, str(source))
    runner.load()
    return runner


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> TransformersCausalLMRunner:
    runner = _load("tiny-llama", tmp_path_factory.mktemp("llama"))
    assert isinstance(runner, TransformersCausalLMRunner)
    return runner


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> SentenceTransformersRunner:
    runner = _load("all-minilm-l6-v2", tmp_path_factory.mktemp("minilm"))
    assert isinstance(runner, SentenceTransformersRunner)
    return runner


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> StableDiffusionRunner:
    runner = _load("tiny-sd", tmp_path_factory.mktemp("sd"))
    assert isinstance(runner, StableDiffusionRunner)
    return runner


def _run(
    runner: TextGenerationRunner, batch: Sequence[GenerationRequest]
) -> list[list[TokenDelta]]:
    """Every request's deltas, checking the step protocol on the way."""
    deltas: list[list[TokenDelta]] = [[] for _ in batch]
    for step in runner.generate(batch):
        assert len(step) == len(batch)
        for row, delta in zip(deltas, step, strict=True):
            assert not isinstance(delta, RowError), delta
            if delta is not None:
                assert not (row and row[-1].finish_reason), "delta after the final one"
                row.append(delta)
    assert all(row and row[-1].finish_reason for row in deltas)
    return deltas


def _text(deltas: list[TokenDelta]) -> str:
    return "".join(d.text for d in deltas)


def _tokens(deltas: list[TokenDelta]) -> int:
    return sum(d.tokens for d in deltas)


def _greedy(prompt: str, max_tokens: int, stop: tuple[str, ...] = ()) -> GenerationRequest:
    return GenerationRequest(prompt, max_tokens, temperature=0.0, stop=stop)


# --- text generation ---------------------------------------------------------------------------


def test_batch_honours_each_rows_max_tokens(llama: TransformersCausalLMRunner) -> None:
    batch = [_greedy("Hello", 3), _greedy("The quick brown fox jumps over the", 9), _greedy("a", 5)]
    steps = list(llama.generate(batch))
    assert len(steps) == 9  # the batch ends with its longest request
    results = _run(llama, batch)
    for request, deltas in zip(batch, results, strict=True):
        assert _tokens(deltas) == request.max_tokens
        assert deltas[-1].finish_reason == "length"


def test_greedy_matches_transformers_generate(llama: TransformersCausalLMRunner) -> None:
    import torch

    prompt = "Once upon a time there was"
    ids = torch.tensor([llama.tokenizer(prompt)["input_ids"]])
    expected = llama.model.generate(ids, max_new_tokens=12, do_sample=False)
    text = llama.tokenizer.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)
    assert _text(_run(llama, [_greedy(prompt, 12)])[0]) == text


def test_greedy_is_deterministic_and_batch_independent(llama: TransformersCausalLMRunner) -> None:
    # Prompts of very different lengths, so the short ones are heavily left-padded.
    prompts = ["Hi", "The weather is nice today: the sky is blue and the birds", "Paris é 世界"]
    batch = [_greedy(p, 16) for p in prompts]
    batched = [_text(d) for d in _run(llama, batch)]
    assert [_text(d) for d in _run(llama, batch)] == batched
    alone = [_text(_run(llama, [request])[0]) for request in batch]
    assert alone == batched
    assert len(set(batched)) == 3


def test_seeded_sampling_is_reproducible(llama: TransformersCausalLMRunner) -> None:
    def sample(seed: int) -> GenerationRequest:
        return GenerationRequest("Tell me a story", 16, temperature=0.9, top_p=0.9, seed=seed)

    batch = [sample(1), sample(2), _greedy("filler prompt here", 4)]
    first = [_text(d) for d in _run(llama, batch)]
    assert [_text(d) for d in _run(llama, batch)] == first
    assert _text(_run(llama, [sample(2)])[0]) == first[1]
    assert first[0] != first[1]


@pytest.mark.parametrize("top_p", [0.0, 1e-6])
def test_tiny_top_p_is_greedy(llama: TransformersCausalLMRunner, top_p: float) -> None:
    sampled = GenerationRequest("The train to London", 10, temperature=1.0, top_p=top_p, seed=5)
    greedy = _greedy("The train to London", 10)
    expected = _text(_run(llama, [greedy])[0])
    assert [_text(d) for d in _run(llama, [sampled, greedy])] == [expected] * 2


def test_load_reports_and_empty_batch(llama: TransformersCausalLMRunner) -> None:
    info = llama.load()
    assert (info.device, info.dtype) == ("cpu", "float32")
    assert 50_000 < info.parameters < 1_000_000
    assert list(llama.generate([])) == []
    (step,) = list(llama.generate([_greedy("hi", 0)]))
    assert isinstance(step[0], RowError) and "max_tokens" in str(step[0].error)


def test_stop_sequence_is_honoured_and_never_emitted(llama: TransformersCausalLMRunner) -> None:
    prompt = "The children played football in the"
    full = _text(_run(llama, [_greedy(prompt, 24)])[0])
    clean = [i for i in range(4, len(full) - 3) if "\ufffd" not in full[i : i + 3]]
    stop = full[clean[len(clean) // 2] :][:3]
    deltas = _run(llama, [_greedy(prompt, 24, stop=("never-there", stop))])[0]
    assert _text(deltas) == full[: full.find(stop)]
    assert deltas[-1].finish_reason == "stop"
    assert stop not in _text(deltas)
    assert _tokens(deltas) < 24


def test_eos_finishes_with_stop(
    llama: TransformersCausalLMRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    prompt = "Good morning"
    ids = torch.tensor([llama.tokenizer(prompt)["input_ids"]])
    generated = llama.model.generate(ids, max_new_tokens=4, do_sample=False)
    new = generated[0, ids.shape[1] :].tolist()
    eos_at = new.index(new[2])
    monkeypatch.setattr(llama, "eos_ids", {new[2]})
    deltas = _run(llama, [_greedy(prompt, 10)])[0]
    assert deltas[-1].finish_reason == "stop"
    assert _tokens(deltas) == eos_at + 1
    assert _text(deltas) == llama.tokenizer.decode(new[:eos_at])


def test_incremental_decode_never_splits_characters(llama: TransformersCausalLMRunner) -> None:
    text = "日本語 ok 🎉!"
    ids = llama.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # some characters span several byte tokens
    row = Row(_greedy("", len(ids)), [], None, llama._decode)
    deltas = [d for d in (row.advance(token, False) for token in ids) if d is not None]
    assert all(isinstance(d, TokenDelta) for d in deltas)
    pieces = [d.text for d in deltas if isinstance(d, TokenDelta)]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert sum(d.tokens for d in deltas if isinstance(d, TokenDelta)) == len(ids)


def test_render_chat_uses_the_template(
    llama: TransformersCausalLMRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = llama.render_chat(messages)
    assert prompt == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    # The template writes BOS itself; tokenizing must not add a second one.
    ids = llama.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert llama.count_tokens(prompt) == len(ids)
    assert _tokens(_run(llama, [_greedy(prompt, 2)])[0]) == 2
    monkeypatch.setattr(llama.tokenizer, "chat_template", None)
    assert llama.render_chat(messages) == "system: Be brief.\nuser: Hi\nassistant:"


def _first_error(runner: TextGenerationRunner, request: GenerationRequest) -> Exception:
    entry = next(iter(runner.generate([request])))[0]
    assert isinstance(entry, RowError)
    return entry.error


def test_too_long_prompt_fails_only_its_row(llama: TransformersCausalLMRunner) -> None:
    limit = llama.card.generation.max_context_tokens
    long_prompt = "word " * limit
    assert llama.count_tokens(long_prompt) > limit - 8
    steps = list(llama.generate([_greedy("fine", 4), _greedy(long_prompt, 8)]))
    failed = steps[0][1]
    assert isinstance(failed, RowError) and isinstance(failed.error, ValueError)
    assert f"max_context_tokens={limit}" in str(failed.error)
    assert all(step[1] is None for step in steps[1:])
    fine = [step[0] for step in steps if isinstance(step[0], TokenDelta)]
    assert sum(d.tokens for d in fine) == 4 and fine[-1].finish_reason == "length"
    fits = llama.tokenizer.decode(llama.tokenizer("word " * 40)["input_ids"][1:])
    allowed = llama.count_tokens(fits)
    assert _tokens(_run(llama, [_greedy(fits, limit - allowed)])[0]) == limit - allowed
    error = _first_error(llama, _greedy(fits, limit - allowed + 1))
    assert isinstance(error, ValueError) and "at most" in str(error)


def test_a_seed_torch_cannot_take_fails_only_its_row(llama: TransformersCausalLMRunner) -> None:
    bad = GenerationRequest("Tell me", 4, temperature=0.8, seed=2**70)
    good = GenerationRequest("Tell me", 4, temperature=0.8, seed=3)
    steps = list(llama.generate([bad, good]))
    assert isinstance(steps[0][0], RowError)
    alone = _text(_run(llama, [good])[0])
    assert "".join(s[1].text for s in steps if isinstance(s[1], TokenDelta)) == alone


def test_rows_leave_the_batch_as_they_finish(llama: TransformersCausalLMRunner) -> None:
    """Finished rows are cut from the batch and its KV cache; the rest decode as if alone."""
    batch = [_greedy("Hello there", 2), _greedy("The weather today", 12), _greedy("a", 6)]
    batched = [_text(d) for d in _run(llama, batch)]
    assert batched == [_text(_run(llama, [request])[0]) for request in batch]


def test_a_cancelled_row_stops_within_one_step(llama: TransformersCausalLMRunner) -> None:
    long, short = _greedy("Once upon a time", 200), _greedy("The sky", 10)
    steps = llama.generate([long, short])
    for _ in range(3):
        next(steps)
    long.cancel.set()
    rest = list(steps)
    assert all(step[0] is None for step in rest)  # nothing more for the cancelled row
    assert len(rest) == 10 - 3  # the batch ends with its live neighbour
    finished = [step[1] for step in rest if isinstance(step[1], TokenDelta)]
    assert finished[-1].finish_reason == "length"
    short.cancel.set()
    assert list(llama.generate([short])) == []  # nothing to do for a cancelled request


# --- stop scanner and echo ---------------------------------------------------------------------


def test_stop_scanner_holds_back_partial_matches() -> None:
    scanner = StopScanner(["END", ""])
    assert scanner.feed("abc E") == "abc "
    assert scanner.feed("abc EN") == ""
    assert scanner.feed("abc ENx") == "ENx"
    assert scanner.feed("abc ENx E") == " "
    assert scanner.feed("abc ENx END more") == ""
    assert scanner.stopped
    assert StopScanner([]).feed("anything") == "anything"
    assert StopScanner(["!!"]).feed("wow!", final=True) == "wow!"


def _reference_cut(text: str, stops: Sequence[str]) -> str:
    found = [text.find(stop) for stop in stops if stop in text]
    return text[: min(found)] if found else text


@pytest.mark.parametrize("seed", range(20))
def test_stop_scanner_matches_a_plain_search(seed: int) -> None:
    rng = random.Random(seed)
    text = "".join(rng.choice("ab ") for _ in range(300))
    stops = ["".join(rng.choice("ab ") for _ in range(rng.randint(1, 9))) for _ in range(3)]
    scanner, out, end = StopScanner(stops), [], 0
    while end < len(text) and not scanner.stopped:
        end = min(len(text), end + rng.randint(1, 5))
        out.append(scanner.feed(text[:end], final=end == len(text)))
    assert "".join(out) == _reference_cut(text, stops)


class _WindowScanner(StopScanner):
    windows: list[int]

    def _scan(self, window: str) -> tuple[int | None, int]:
        self.windows.append(len(window))
        return super()._scan(window)


def test_stop_scanner_scans_only_the_tail() -> None:
    """Each feed looks at the held-back text, the new text and one stop's length before them,
    whatever the completion's length: linear per token, also for a long stop that keeps
    partly matching."""
    stop = "a" * 999 + "b"
    scanner = _WindowScanner([stop])
    scanner.windows = []
    text = ""
    for _ in range(2000):
        text += "aa"
        scanner.feed(text)
    assert not scanner.stopped and scanner.emitted == len(text) - (len(stop) - 1)
    assert max(scanner.windows) <= 2 * len(stop) + 2


def test_echo_max_tokens_and_finish_reasons() -> None:
    runner = EchoRunner(_card("echo"), None)
    runner.load()
    batch = [
        GenerationRequest("one two three four", 2),
        GenerationRequest("one two", 5),
        GenerationRequest("", 3),
    ]
    first, second, empty = _run(runner, batch)
    assert (_text(first), _tokens(first), first[-1].finish_reason) == ("one two ", 2, "length")
    assert (_text(second), _tokens(second), second[-1].finish_reason) == ("one two", 2, "stop")
    assert (_text(empty), _tokens(empty), empty[-1].finish_reason) == ("", 0, "stop")
    assert runner.count_tokens("one two three") == 3
    assert runner.render_chat([{"role": "user", "content": "hey there"}]) == "hey there"


def test_echo_stop_sequences_are_never_emitted() -> None:
    runner = EchoRunner(_card("echo"), None)
    spanning = GenerationRequest("alpha beta gamma delta", 10, stop=("beta gam",))
    inside = GenerationRequest("alpha beta gamma delta", 10, stop=("mm",))
    unmatched = GenerationRequest("alpha beta", 10, stop=("beta gam",))
    (a,), (b,), (c,) = ([_run(runner, [r])[0]] for r in (spanning, inside, unmatched))
    assert (_text(a), a[-1].finish_reason, _tokens(a)) == ("alpha ", "stop", 3)
    assert (_text(b), b[-1].finish_reason) == ("alpha beta ga", "stop")
    assert (_text(c), c[-1].finish_reason, _tokens(c)) == ("alpha beta", "stop", 2)


# --- embeddings --------------------------------------------------------------------------------


def test_embeddings_are_real_and_normalised(minilm: SentenceTransformersRunner) -> None:
    assert minilm.dimensions == 384
    assert minilm.max_input_tokens == 256
    cat, kitten, stocks = minilm.embed(["a cat", "a kitten", "stock market report"])
    assert all(len(v) == 384 and math.isclose(math.hypot(*v), 1.0, abs_tol=1e-4) for v in [cat])

    def cosine(u: list[float], v: list[float]) -> float:
        return sum(a * b for a, b in zip(u, v, strict=True))

    assert cosine(cat, kitten) > cosine(cat, stocks) + 0.2
    assert minilm.embed([]) == []


def test_embedding_token_counts_and_truncation(minilm: SentenceTransformersRunner) -> None:
    assert minilm.count_tokens("hello world") == 4  # [CLS] hello world [SEP]
    long_text = "word " * 1000
    assert minilm.count_tokens(long_text) > minilm.max_input_tokens
    (vector,) = minilm.embed([long_text])  # truncated, not rejected
    assert math.isclose(math.hypot(*vector), 1.0, abs_tol=1e-4)


# --- images ------------------------------------------------------------------------------------


def _size(png: bytes) -> tuple[int, int]:
    from PIL import Image

    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        return image.size


def _images(outcome: list[bytes] | RowError) -> list[bytes]:
    assert isinstance(outcome, list), outcome
    return outcome


def test_images_are_pngs_of_the_requested_size(tiny_sd: StableDiffusionRunner) -> None:
    batch = [
        ImageRequest("a red cat", n=2, seed=1),
        ImageRequest("a dog", n=1, width=32, height=48, seed=2, negative_prompt="blurry"),
        ImageRequest("the sky", n=1, seed=3),
    ]
    results = [_images(outcome) for outcome in tiny_sd.generate(batch)]
    assert [len(images) for images in results] == [2, 1, 1]
    assert [_size(png) for png in results[0] + results[2]] == [(64, 64)] * 3
    assert _size(results[1][0]) == (32, 48)
    assert results[0][0] != results[0][1]  # n images of one request differ


def test_image_seeds_are_reproducible(tiny_sd: StableDiffusionRunner) -> None:
    import numpy as np
    from PIL import Image

    request = ImageRequest("a cat", n=1, seed=7, num_inference_steps=1)
    alone = _images(tiny_sd.generate([request])[0])[0]
    assert _images(tiny_sd.generate([request])[0])[0] == alone
    pair = tiny_sd.generate([ImageRequest("a dog", seed=8, num_inference_steps=1), request])
    batched = _images(pair[1])

    def pixels(png: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)

    # Batched convolutions may round differently in the last bit.
    assert np.abs(pixels(batched[0]) - pixels(alone)).max() <= 2


@pytest.mark.parametrize(
    "request_",
    [
        ImageRequest("x", width=63),
        ImageRequest("x", height=2048),
        ImageRequest("x", n=0),
        ImageRequest("x", n=99),
        ImageRequest("x", num_inference_steps=0),
    ],
)
def test_invalid_image_requests_fail_alone(
    tiny_sd: StableDiffusionRunner, request_: ImageRequest
) -> None:
    failed, drawn = tiny_sd.generate([request_, ImageRequest("y", num_inference_steps=1)])
    assert isinstance(failed, RowError) and isinstance(failed.error, ValueError)
    assert isinstance(drawn, list) and len(drawn) == 1


class _CancellingSD(StableDiffusionRunner):
    """Cancels every request after the first denoising step and records the steps run."""

    steps: list[int]

    def _on_step_end(self, requests: list[ImageRequest], step: int) -> None:
        self.steps.append(step)
        for request in requests:
            request.cancel.set()
        super()._on_step_end(requests, step)


def test_a_cancelled_image_stops_at_the_next_step(tiny_sd: StableDiffusionRunner) -> None:
    runner = _CancellingSD(tiny_sd.card, tiny_sd.source)
    runner.pipeline, runner.steps = tiny_sd.pipeline, []
    (outcome,) = runner.generate([ImageRequest("x", num_inference_steps=2)])
    assert isinstance(outcome, RowError) and isinstance(outcome.error, GenerationCancelled)
    assert runner.steps == [0]
    early = ImageRequest("y", num_inference_steps=2)
    early.cancel.set()
    runner.steps = []
    (outcome,) = runner.generate([early])
    assert isinstance(outcome, RowError) and runner.steps == []
