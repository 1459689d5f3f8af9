"""Cache settings that are secrets (the Redis URL, the signing key) stay out of reprs, dumps and
error messages; Redis URLs may be redis://, rediss:// (TLS) or unix://."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.cache.config import CacheConfig, CacheConfigError

PASSWORD = "hunter2-very-secret"
URL = f"redis://default:{PASSWORD}@redis.internal:6379/0"
SIGNING_KEY = "signing-key-0123456789"


def test_secrets_stay_out_of_repr_str_and_dumps() -> None:
    config = CacheConfig(tiers="redis", redis_url=URL, redis_signing_key=SIGNING_KEY)
    for text in (repr(config), str(config), config.model_dump_json(), str(config.model_dump())):
        assert PASSWORD not in text and SIGNING_KEY not in text
    assert config.redis_url.get_secret_value() == URL


def test_env_values_load_and_invalid_ones_fail_without_echoing_secrets() -> None:
    env = {"APP_CACHE_TIERS": "redis", "APP_CACHE_REDIS_URL": URL}
    assert CacheConfig.from_env(env).redis_url.get_secret_value() == URL
    bad = {
        "APP_CACHE_TIERS": "redis",
        "APP_CACHE_REDIS_URL": f"http://:{PASSWORD}@redis.internal",
        "APP_CACHE_REDIS_SIGNING_KEY": "too-short",
    }
    with pytest.raises(CacheConfigError) as info:
        CacheConfig.from_env(bad)
    message = str(info.value)
    assert "APP_CACHE_REDIS_URL" in message and "APP_CACHE_REDIS_SIGNING_KEY" in message
    assert PASSWORD not in message and "too-short" not in message
    with pytest.raises(ValidationError) as raw:
        CacheConfig(tiers="redis", redis_url=f"tcp://:{PASSWORD}@h")
    assert PASSWORD not in str(raw.value) and PASSWORD not in repr(raw.value)


@pytest.mark.parametrize(
    "url",
    [
        "rediss://default:pw@redis.example.com:6380/0",
        "rediss://redis.example.com:6380",
        "redis://127.0.0.1:6379/1",
        "unix:///var/run/redis.sock?db=0",
    ],
)
def test_redis_tls_and_socket_urls_are_accepted_as_given(url: str) -> None:
    config = CacheConfig(tiers="redis", redis_url=url)
    assert config.redis_url.get_secret_value() == url


def test_ca_certificates_need_a_tls_url() -> None:
    ok = CacheConfig(tiers="redis", redis_url="rediss://h:6380", redis_ssl_ca_certs="/etc/ca.pem")
    assert ok.redis_ssl_ca_certs == "/etc/ca.pem"
    with pytest.raises(ValidationError, match="rediss://"):
        CacheConfig(tiers="redis", redis_url="redis://h:6379", redis_ssl_ca_certs="/etc/ca.pem")


def test_blank_signing_key_settings_mean_unset() -> None:
    env = {"APP_CACHE_REDIS_SIGNING_KEY": " ", "APP_CACHE_REDIS_SIGNING_KEY_FILE": ""}
    config = CacheConfig.from_env(env)
    assert config.redis_signing_key is None and config.redis_signing_key_file is None


def test_the_actors_get_no_redis_settings_and_masked_dumps_cannot_reach_redis() -> None:
    config = CacheConfig(tiers="actors,redis", redis_url=URL, redis_signing_key=SIGNING_KEY)
    settings = config.shard_settings()
    assert not any(name.startswith("redis_") for name in settings)
    assert CacheConfig.model_validate(settings).num_shards == config.num_shards
    # An actors-only config still survives a JSON dump (tests and actors pass those around);
    # a Redis config whose URL the dump masked fails, saying why.
    CacheConfig.model_validate(CacheConfig().model_dump(mode="json"))
    with pytest.raises(ValidationError, match="masks"):
        CacheConfig.model_validate(config.model_dump(mode="json"))
