"""Which base URLs a load test may target: loopback, or a host the user names with --allow-host."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit, urlunsplit


class TargetRefusedError(ValueError):
    """The base URL is not loopback and the user did not allow its host."""


def normalize_base_url(url: str) -> str:
    """`http://h:8000` and `http://h:8000/v1/` both become `http://h:8000/v1`."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL with a host")
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r}: a base URL has no query or fragment")
    path = parts.path.rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def is_loopback(host: str) -> bool:
    """Only names that cannot leave the machine: `localhost` and loopback addresses. Other
    names are not resolved, since what a name resolves to can change between check and use."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_target(url: str, allow_hosts: list[str]) -> str:
    """The URL's host, if a load test may target it; else TargetRefusedError."""
    host = (urlsplit(url).hostname or "").lower()
    allowed = {name.lower().strip("[]") for name in allow_hosts}
    if is_loopback(host) or host in allowed:
        return host
    raise TargetRefusedError(
        f"{host!r} is not a loopback address: a load test only targets this machine unless "
        f"you name the host, with --allow-host {host} (allow_hosts in a config file)"
    )
