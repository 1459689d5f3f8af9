"""A load test only targets loopback, or hosts the user names."""

from __future__ import annotations

import re

import pytest

from app.loadtest.config import LoadTestConfigError, build_config
from app.loadtest.safety import TargetRefusedError, check_target, is_loopback, normalize_base_url


@pytest.mark.parametrize(
    "host", ["localhost", "LOCALHOST", "127.0.0.1", "127.8.9.10", "::1", "[::1]"]
)
def test_loopback(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize(
    "host", ["10.0.0.1", "0.0.0.0", "192.168.1.5", "example.com", "localhost.example.com", ""]
)
def test_not_loopback(host: str) -> None:
    assert not is_loopback(host)


def test_non_loopback_needs_allow_host() -> None:
    with pytest.raises(TargetRefusedError, match=re.escape("--allow-host api.example.com")):
        check_target("https://api.example.com/v1", [])
    assert check_target("https://API.example.com/v1", ["api.example.com"]) == "api.example.com"
    assert check_target("http://[::1]:8000/v1", []) == "::1"


def test_config_refuses_a_remote_target_unless_allowed() -> None:
    stages = [{"duration_s": 1, "users": 1}]
    with pytest.raises(
        LoadTestConfigError, match=re.escape("base_url: '10.1.2.3' is not a loopback")
    ):
        build_config({"base_url": "http://10.1.2.3:8000", "stages": stages})
    allowed = build_config(
        {"base_url": "http://10.1.2.3:8000", "stages": stages, "allow_hosts": ["10.1.2.3"]}
    )
    assert allowed.base_url == "http://10.1.2.3:8000/v1"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1"),
        ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000/v1"),
        ("http://localhost:8000/models/echo/v1", "http://localhost:8000/models/echo/v1"),
        ("https://localhost/api", "https://localhost/api/v1"),
    ],
)
def test_normalize_base_url(url: str, expected: str) -> None:
    assert normalize_base_url(url) == expected


@pytest.mark.parametrize(
    "url", ["ftp://127.0.0.1/v1", "127.0.0.1:8000", "http:///v1", "http://h/v1?x=1"]
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ValueError):
        normalize_base_url(url)
