"""Peer authentication between region gateways: an HMAC-SHA256 signature over the time, the
sending region, the path and the body, keyed by the federation secret. The secret comes from the
environment or a file, never from the spec, and is never logged; a signature is valid for five
minutes, so one captured in transit can only be replayed briefly (peers speak TLS in production)."""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from pathlib import Path

from app.regions.spec import Federation

FORWARDED_FROM = "x-app-forwarded-from"  # the hop marker: a forwarded request is never forwarded
SIGNATURE = "x-app-federation-signature"
MAX_SKEW_S = 300.0


class FederationSecretError(ValueError):
    """The federation secret is configured but cannot be read, or is too short."""


def load_secret(config: Federation) -> bytes | None:
    """The secret from `secret_file` if set, else from the `secret_env` variable; None when
    neither is set (federation then neither forwards nor accepts forwarded requests)."""
    if config.secret_file:
        try:
            text = Path(config.secret_file).read_text().strip()
        except OSError as exc:
            raise FederationSecretError(
                f"federation.secret_file {config.secret_file}: {exc.strerror}"
            ) from exc
        except UnicodeDecodeError as exc:
            raise FederationSecretError(
                f"federation.secret_file {config.secret_file}: not UTF-8 text"
            ) from exc
        if not text:
            raise FederationSecretError(f"federation.secret_file {config.secret_file} is empty")
    else:
        text = os.environ.get(config.secret_env, "").strip()
    if not text:
        return None
    if len(text) < 16:
        raise FederationSecretError("the federation secret must be at least 16 characters")
    return text.encode()


def sign(secret: bytes, region: str, path: str, body: bytes, now: float | None = None) -> str:
    stamp = int(time.time() if now is None else now)
    return f"t={stamp},s={_mac(secret, stamp, region, path, body)}"


def verify(
    secret: bytes | None,
    header: str | None,
    region: str | None,
    path: str,
    body: bytes,
    now: float | None = None,
) -> str | None:
    """None when the signature is valid, else why not (said to the caller, without secrets)."""
    if secret is None:
        return "this region accepts no forwarded requests: no federation secret is configured"
    if not header or not region:
        return f"a forwarded request needs the {SIGNATURE} and {FORWARDED_FROM} headers"
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        stamp, mac = int(fields["t"]), fields["s"]
    except (KeyError, ValueError):
        return f"malformed {SIGNATURE} header"
    if not mac.isascii():
        return f"malformed {SIGNATURE} header"
    current = time.time() if now is None else now
    if abs(current - stamp) > MAX_SKEW_S:
        return "the federation signature has expired (or the clocks differ by over 5 minutes)"
    if not hmac.compare_digest(mac, _mac(secret, stamp, region, path, body)):
        return "the federation signature does not match"
    return None


def _mac(secret: bytes, stamp: int, region: str, path: str, body: bytes) -> str:
    message = f"{stamp}\n{region}\n{path}\n".encode() + hashlib.sha256(body).digest()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()
