"""The Redis tier's construction without a server: TLS URLs build TLS clients, and the URL's
password never reaches a log line or a logged error."""

from __future__ import annotations

import logging

import pytest
from redis.asyncio.connection import SSLConnection

from app.cache.config import CacheConfig
from app.cache.redis_tier import RedisTier, redact_url, redis_client, url_secrets

PASSWORD = "p@ss/word"
QUOTED = "p%40ss%2Fword"


def test_a_rediss_url_builds_a_tls_client_with_the_ca_bundle() -> None:
    url = f"rediss://default:{QUOTED}@redis.example.com:6380/2"
    config = CacheConfig(tiers="redis", redis_url=url, redis_ssl_ca_certs="/etc/ca.pem")
    pool = redis_client(config).connection_pool
    assert pool.connection_class is SSLConnection
    kwargs = pool.connection_kwargs
    assert kwargs["ssl_ca_certs"] == "/etc/ca.pem" and kwargs["password"] == PASSWORD
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("redis.example.com", 6380, 2)


def test_a_rediss_cluster_url_builds_a_tls_cluster_client() -> None:
    url = "rediss://redis.example.com:6380"
    config = CacheConfig(tiers="redis", redis_url=url, redis_cluster=True)
    client = redis_client(config)
    assert client.connection_kwargs["connection_class"] is SSLConnection


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        (f"redis://:{QUOTED}@h:1/0", "redis://:***@h:1/0"),
        (f"rediss://u:{QUOTED}@h:1/0?password=x%2By", "rediss://u:***@h:1/0?password=***"),
        ("unix://:pw@/tmp/redis.sock?db=1", "unix://:***@/tmp/redis.sock?db=1"),
    ],
)
def test_logged_urls_hide_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_every_spelling_of_the_password_is_redacted_from_error_text(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"redis://default:{QUOTED}@h:1/0?password=second-secret"
    assert set(url_secrets(url)) == {PASSWORD, QUOTED, "second-secret"}
    with caplog.at_level(logging.INFO, logger="app.cache.redis_tier"):
        tier = RedisTier(CacheConfig(tiers="redis", redis_url=url))
    said = tier.redact(f"AUTH {PASSWORD} failed for {url}")
    for secret in (PASSWORD, QUOTED, "second-secret"):
        assert secret not in said and secret not in caplog.text
    assert "h:1" in caplog.text  # the URL is logged, masked
