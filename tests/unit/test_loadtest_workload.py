"""What users send: the mix, request bodies, and the tally of a stream's events."""

from __future__ import annotations

import random
from collections import Counter

from app.loadtest.config import RequestKind, build_config
from app.loadtest.workload import PATHS, StreamTally, Workload, body, prompt_text, usage_tokens

MODELS = {kind: "gen" for kind in RequestKind} | {RequestKind.EMBEDDING: "emb"}


def test_the_mix_follows_its_weights_and_skips_zero() -> None:
    config = build_config(
        {
            "base_url": "http://127.0.0.1:8000",
            "stages": [{"duration_s": 1, "users": 1}],
            "mix": {"chat": 3, "stream": 1, "completion": 0, "embedding": 0},
            "prompt_tokens": {"kind": "uniform", "low": 4, "high": 8},
            "output_tokens": {"kind": "fixed", "tokens": 7},
        }
    )
    workload = Workload(config, MODELS, random.Random(3))
    drawn = [workload.next() for _ in range(2000)]
    kinds = Counter(r.kind for r in drawn)
    assert set(kinds) == {RequestKind.CHAT, RequestKind.STREAM}
    assert 2.5 < kinds[RequestKind.CHAT] / kinds[RequestKind.STREAM] < 3.5
    assert {r.body["max_tokens"] for r in drawn} == {7}
    words = {len(r.body["messages"][0]["content"].split()) for r in drawn}
    assert words == {4, 5, 6, 7, 8}


def test_bodies_and_paths() -> None:
    stream = body(RequestKind.STREAM, "m", "hi", 5)
    assert stream["stream"] is True and stream["stream_options"] == {"include_usage": True}
    assert "stream" not in body(RequestKind.CHAT, "m", "hi", 5)
    assert body(RequestKind.COMPLETION, "m", "hi", 5) == {
        "model": "m",
        "prompt": "hi",
        "max_tokens": 5,
    }
    assert body(RequestKind.EMBEDDING, "e", "hi", 5) == {"model": "e", "input": "hi"}
    assert PATHS[RequestKind.COMPLETION] == "/completions"


def test_prompts_differ_so_no_cache_answers_them() -> None:
    rng = random.Random(0)
    prompts = {prompt_text(rng, 10) for _ in range(100)}
    assert len(prompts) == 100
    assert all(len(p.split()) == 10 for p in prompts)


def chunk(text: str) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":"' + text.encode() + b'"}}]}\n'


def test_stream_tally_times_tokens() -> None:
    tally = StreamTally()
    tally.feed(b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n', 0.01)  # no text yet
    tally.feed(b"\n", 0.02)
    tally.feed(chunk("a"), 0.10)
    tally.feed(chunk("b"), 0.15)
    tally.feed(b'data: {"choices":[{"index":0,"text":"c"}]}\r\n', 0.30)  # completions shape
    tally.feed(b'data: {"choices":[],"usage":{"completion_tokens":5}}\n', 0.31)
    tally.feed(b"data: [DONE]\n", 0.32)
    assert tally.first_token_s == 0.10
    assert [round(g, 3) for g in tally.gaps_s] == [0.05, 0.15]
    assert tally.tokens == 3 and tally.output_tokens == 5
    assert tally.done and tally.error is None


def test_stream_tally_in_band_error() -> None:
    tally = StreamTally()
    tally.feed(chunk("a"), 0.1)
    tally.feed(b'data: {"error":{"message":"replica died","type":"internal"}}\n', 0.2)
    tally.feed(b"data: [DONE]\n", 0.3)
    assert tally.error == "replica died" and tally.done
    broken = StreamTally()
    broken.feed(b"data: {not json\n", 0.1)
    assert broken.error == "unparsable event"


def test_usage_tokens() -> None:
    assert usage_tokens({"usage": {"completion_tokens": 4}}) == 4
    assert usage_tokens({"usage": None}) is None
