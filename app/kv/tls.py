"""TLS of the KV direct transport, taken from Ray's own TLS settings.

When Ray runs with TLS (RAY_USE_TLS=1, with RAY_TLS_SERVER_CERT, RAY_TLS_SERVER_KEY and
RAY_TLS_CA_CERT, as Ray's gRPC reads them), the direct transport uses TLS with the same files:
TLS 1.2 or later, each end presenting the node certificate and requiring the peer's to be signed
by the cluster CA (mutual TLS, as Ray's gRPC does). Host names are not checked: Ray's node
certificates need not name the IP a member listens on, and which member answers is what the
handshake's HMAC proves (app.kv.handshake); a man in the middle would need both a certificate
of the cluster's CA and the member's secret.

If Ray runs with TLS but these files cannot be loaded, the transport stays off in that process
(a member publishes no endpoint; a client sends every call through Ray): it never falls back to
plain TCP. A member's endpoint says whether it speaks TLS, and a client connects only to one
that speaks what the client's own settings require, so neither side downgrades the other.
"""

from __future__ import annotations

import functools
import logging
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

USE_TLS = "RAY_USE_TLS"
CERT, KEY, CA = "RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT"


@dataclass(frozen=True)
class TransportTLS:
    """`required`: Ray runs with TLS. The contexts are None when it does not, or when it does
    but the files could not be loaded (then the transport is not `usable`)."""

    required: bool
    server: ssl.SSLContext | None = None
    client: ssl.SSLContext | None = None

    @property
    def usable(self) -> bool:
        return not self.required or (self.server is not None and self.client is not None)

    @classmethod
    def from_files(cls, cert: str, key: str, ca: str) -> TransportTLS:
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False  # see the module docstring
        for context in (server, client):
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_cert_chain(cert, key)
            context.load_verify_locations(ca)
        return cls(True, server, client)


PLAIN = TransportTLS(False)


def ray_tls(environ: Mapping[str, str] | None = None) -> TransportTLS:
    """The transport's TLS as Ray's environment variables set it (loaded once per file set)."""
    env = os.environ if environ is None else environ
    if env.get(USE_TLS, "0").lower() not in ("1", "true"):
        return PLAIN
    return _load(env.get(CERT), env.get(KEY), env.get(CA))


@functools.lru_cache(maxsize=8)
def _load(cert: str | None, key: str | None, ca: str | None) -> TransportTLS:
    try:
        if not (cert and key and ca):
            raise FileNotFoundError(f"{USE_TLS} is set but not all of {CERT}, {KEY}, {CA}")
        return TransportTLS.from_files(cert, key, ca)
    except (OSError, ssl.SSLError, ValueError) as exc:
        log.warning(
            "Ray runs with TLS, but the KV direct transport cannot use its files (%s): the "
            "transport stays off here and calls go through Ray",
            exc,
        )
        return TransportTLS(True)
