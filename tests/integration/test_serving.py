"""The serving platform end to end on real Ray Serve with the real offline models: every endpoint
through OpenAI's own client on both base URLs, every error class, batching, a second Ray job."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = [{"role": "user", "content": "hello there world"}]


@pytest.fixture(params=["gateway", "direct"])
def chat_base(request: pytest.FixtureRequest, serving: str) -> str:
    """The OpenAI base URL for the echo model: the shared gateway or the model's own URL."""
    return f"{serving}/v1" if request.param == "gateway" else f"{serving}/models/echo/v1"


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


def test_model_without_running_app_is_503_with_retry_after(serving: str) -> None:
    # First test on the gateway on purpose: its status cache is still empty.
    body = {"model": "echo-offline", "messages": MESSAGES}
    r = httpx.post(f"{serving}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 503
    assert int(r.headers["retry-after"]) > 0
    assert r.json()["error"]["code"] == "no_replica_available"
    health = httpx.get(f"{serving}/healthz", timeout=30).json()
    assert health["status"] == "degraded" and health["models"]["echo"] == "RUNNING"


def test_models_list(serving: str) -> None:
    ids = {m.id for m in client(f"{serving}/v1").models.list().data}
    assert {"echo", "tiny-llama", "all-minilm-l6-v2", "tiny-sd", "echo-offline"} <= ids
    assert [m.id for m in client(f"{serving}/models/echo/v1").models.list().data] == ["echo"]


def test_chat_on_both_base_urls(chat_base: str) -> None:
    reply = client(chat_base).chat.completions.create(model="echo", messages=MESSAGES)
    assert reply.choices[0].message.content == "hello there world"
    assert reply.usage is not None and reply.usage.completion_tokens == 3


def test_chat_stream_on_both_base_urls(chat_base: str) -> None:
    stream = client(chat_base).chat.completions.create(
        model="echo", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "hello there world"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 6


def test_real_text_model_completions_and_stream(serving: str) -> None:
    api = client(f"{serving}/v1")
    reply = api.completions.create(
        model="tiny-llama", prompt="Once upon", max_tokens=5, temperature=0
    )
    again = api.completions.create(
        model="tiny-llama", prompt="Once upon", max_tokens=5, temperature=0
    )
    assert reply.choices[0].text == again.choices[0].text, "greedy decoding must be deterministic"
    assert reply.usage is not None and 1 <= reply.usage.completion_tokens <= 5
    pieces = [
        c.choices[0].text
        for c in api.completions.create(
            model="tiny-llama", prompt="Once upon", max_tokens=5, temperature=0, stream=True
        )
    ]
    assert "".join(pieces) == reply.choices[0].text
    chat = api.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=4)
    assert chat.choices[0].finish_reason in ("length", "stop")


def test_batching_forms_batches_under_concurrency(serving: str) -> None:
    from ray import serve

    from app.api.schemas import CompletionRequest

    handle = serve.get_app_handle("model-tiny-llama")
    before = handle.stats.remote().result()["batches"]
    requests = [
        CompletionRequest(model="tiny-llama", prompt=f"story {i}", max_tokens=8, temperature=0)
        for i in range(12)
    ]
    responses = [handle.completions.remote(r) for r in requests]
    assert all(r.result()["choices"][0]["text"] is not None for r in responses)
    stats = handle.stats.remote().result()
    # tiny-llama's card runs the continuous engine on a CPU: requests decode together (the
    # running batch grew past one) and each iteration counts as a batch.
    assert stats["engine"]["engine"] == "continuous"
    assert stats["largest_batch"] > 1
    assert stats["batches"] > before


def test_embeddings_string_and_list(serving: str) -> None:
    api = client(f"{serving}/v1")
    single = api.embeddings.create(model="all-minilm-l6-v2", input="a cat")
    assert len(single.data[0].embedding) == 384
    many = api.embeddings.create(
        model="all-minilm-l6-v2", input=["a cat", "a kitten", "quarterly stock market report"]
    )
    vectors = np.array([d.embedding for d in many.data])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    assert many.usage.prompt_tokens > 0


def test_images_b64_png(serving: str) -> None:
    reply = client(f"{serving}/v1").images.generate(
        model="tiny-sd", prompt="a red square", n=2, size="64x64", response_format="b64_json"
    )
    assert reply.data is not None and len(reply.data) == 2
    for item in reply.data:
        assert item.b64_json is not None
        image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert image.format == "PNG" and image.size == (64, 64)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{broken", 400, None),
        (json.dumps({"model": "echo", "messages": "hi"}).encode(), 400, "messages"),
        (
            json.dumps({"model": "echo", "messages": MESSAGES, "max_tokens": -1}).encode(),
            400,
            "max_tokens",
        ),
        (json.dumps({"model": "echo", "messages": MESSAGES, "n": 0}).encode(), 400, "n"),
        (
            json.dumps({"model": "echo", "messages": MESSAGES, "temperature": -1}).encode(),
            400,
            "temperature",
        ),
        (json.dumps({"model": "nope", "messages": MESSAGES}).encode(), 404, "model"),
        (
            json.dumps({"model": "nope", "messages": MESSAGES, "stream": True}).encode(),
            404,
            "model",
        ),
        (
            json.dumps(
                {"model": "echo", "messages": [{"role": "user", "content": "x" * (5 << 20)}]}
            ).encode(),
            413,
            None,
        ),
    ],
)
def test_bad_input_gets_the_right_4xx(
    chat_base: str, body: bytes, status: int, param: str | None
) -> None:
    r = httpx.post(f"{chat_base}/chat/completions", content=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_openai_client_raises_typed_errors(serving: str) -> None:
    api = client(f"{serving}/v1")
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model="echo", messages=MESSAGES, max_tokens=-5)
    with pytest.raises(openai.BadRequestError):
        api.embeddings.create(model="echo", input="x")


def test_gpu_card_on_cpu_cluster_fails_at_deploy_time(tmp_path: Path, serving: str) -> None:
    from app.serving.builder import ResourceUnavailableError, build_model_app

    (tmp_path / "big.yaml").write_text(
        "id: big\ntask: text-generation\nloader: echo\nresources: {num_gpus: 1}\n"
    )
    with pytest.raises(ResourceUnavailableError, match="GPU"):
        build_model_app({"catalogue": str(tmp_path), "model": "big"})
    app = build_model_app({"catalogue": str(tmp_path), "model": "big", "force_cpu": True})
    assert app is not None


SECOND_DRIVER = textwrap.dedent(
    """
    import json, sys
    import ray
    from app.client import InferenceClient
    from app.api.schemas import (
        ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ImageGenerationRequest,
    )
    from app.api.errors import ModelNotFoundError

    ray.init(address=sys.argv[1], log_to_driver=False)
    client = InferenceClient()
    messages = [{"role": "user", "content": "from another job"}]
    out = {
        "models": client.models(),
        "chat": client.chat(ChatCompletionRequest(model="echo", messages=messages)),
        "stream": [c for c in client.chat_stream(
            ChatCompletionRequest(model="echo", messages=messages, stream=True))],
        "completion": client.completions(CompletionRequest(model="tiny-llama", prompt="hi", max_tokens=3)),
        "embedding": client.embeddings(EmbeddingRequest(model="all-minilm-l6-v2", input=["x", "y"])),
        "image": client.images(ImageGenerationRequest(model="tiny-sd", prompt="dot", size="64x64")),
    }
    try:
        client.handle("nope")
    except ModelNotFoundError as exc:
        out["unknown"] = exc.status
    print("RESULT " + json.dumps(out))
    """
)


def test_second_ray_job_calls_the_handles(serving: str, ray_cluster: object) -> None:
    address = ray_cluster.address  # type: ignore[attr-defined]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", SECOND_DRIVER, address],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line.removeprefix("RESULT "))
    assert {"echo", "tiny-llama", "all-minilm-l6-v2", "tiny-sd"} <= set(out["models"])
    assert out["chat"]["choices"][0]["message"]["content"] == "from another job"
    streamed = "".join(
        c["choices"][0]["delta"].get("content", "") for c in out["stream"] if c["choices"]
    )
    assert streamed == "from another job"
    assert out["completion"]["usage"]["completion_tokens"] >= 1
    assert len(out["embedding"]["data"]) == 2
    assert base64.b64decode(out["image"]["data"][0]["b64_json"]).startswith(b"\x89PNG")
    assert out["unknown"] == 404


def test_cli_status_reports_every_model(serving: str, ray_cluster: object) -> None:
    env = os.environ | {"RAY_ADDRESS": ray_cluster.address}  # type: ignore[attr-defined]
    done = subprocess.run(
        [sys.executable, "-m", "app", "status", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    entry = report["model-tiny-llama"]
    assert entry["status"] == "RUNNING" and entry["model"] == "tiny-llama"
    assert sum(entry["deployments"]["model-tiny-llama"]["replicas"].values()) >= 1
    assert entry["resources"]["num_cpus"] == 0.5
