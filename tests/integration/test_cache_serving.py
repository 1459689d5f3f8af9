"""The response cache in the real serving path (the shared `serving` deployment): repeated
deterministic requests are answered from the cache over HTTP on both base URLs and over handles,
with X-Cache saying so; opt-outs and sampled requests are computed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
EMBED = "all-minilm-l6-v2"


@pytest.fixture(params=["gateway", "direct"])
def embed_base(request: pytest.FixtureRequest, serving: str) -> str:
    return f"{serving}/v1" if request.param == "gateway" else f"{serving}/models/{EMBED}/v1"


def test_repeated_embeddings_request_is_served_from_the_cache(embed_base: str) -> None:
    body = {"model": EMBED, "input": [f"a cat {uuid.uuid4().hex}", "a kitten"]}
    first = httpx.post(f"{embed_base}/embeddings", json=body, timeout=60)
    second = httpx.post(f"{embed_base}/embeddings", json=body, timeout=60)
    assert first.status_code == second.status_code == 200, first.text
    assert first.headers["x-cache"] == "miss" and second.headers["x-cache"] == "hit"
    assert second.json() == first.json()
    bypass = httpx.post(
        f"{embed_base}/embeddings", json=body, headers={"Cache-Control": "no-cache"}, timeout=60
    )
    assert bypass.headers["x-cache"] == "bypass" and bypass.json()["data"] == first.json()["data"]


def test_greedy_chat_is_cached_and_sampled_chat_is_not(serving: str) -> None:
    messages = [{"role": "user", "content": f"cache me {uuid.uuid4().hex}"}]
    url = f"{serving}/v1/chat/completions"
    greedy = {"model": "echo", "messages": messages, "temperature": 0}
    statuses = [httpx.post(url, json=greedy, timeout=60).headers["x-cache"] for _ in range(2)]
    assert statuses == ["miss", "hit"]
    sampled = greedy | {"temperature": 0.8}
    assert httpx.post(url, json=sampled, timeout=60).headers["x-cache"] == "bypass"


# In its own Ray job: a handle made in the test driver keeps routing threads that outlive
# ray.shutdown at the end of the session.
HANDLE_DRIVER = textwrap.dedent(
    """
    import json, sys, uuid
    import ray
    from app.api.schemas import EmbeddingRequest
    from app.client import InferenceClient

    ray.init(address=sys.argv[1], log_to_driver=False)
    client = InferenceClient()
    text = f"handle {uuid.uuid4().hex}"
    first = client.embeddings(EmbeddingRequest(model=sys.argv[2], input=text))
    again = client.embeddings(EmbeddingRequest(model=sys.argv[2], input=text))
    skipped = client.embeddings(
        EmbeddingRequest(model=sys.argv[2], input=text, cache_bypass=True)
    )
    out = {
        "status": [r["x_cache"] for r in (first, again, skipped)],
        "same": again["data"] == first["data"],
    }
    print("RESULT " + json.dumps(out))
    """
)


def test_handle_callers_see_the_cache_status_and_can_opt_out(
    serving: str, ray_cluster: object
) -> None:
    address = ray_cluster.address  # type: ignore[attr-defined]
    done = subprocess.run(
        [sys.executable, "-c", HANDLE_DRIVER, address, EMBED],
        capture_output=True,
        text=True,
        timeout=240,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line.removeprefix("RESULT "))
    assert out == {"status": ["miss", "hit", "bypass"], "same": True}
