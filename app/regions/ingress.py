"""The receiving side of federation on an HTTP entry point (a region's gateway, or a model's own
URL, which peers forward to directly to save a hop): a request that says it was forwarded must
carry a valid signature, checked before anything else."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from app.api.errors import AuthenticationError
from app.api.http import MAX_REQUEST_BYTES, error_response
from app.regions.auth import FORWARDED_FROM, SIGNATURE, verify

BAD_SIGNATURE = "invalid_federation_signature"  # the code of a peer request that fails its check


def is_forwarded(request: Request) -> bool:
    return FORWARDED_FROM in request.headers


async def peer_refusal(request: Request, secret: bytes | None) -> Response | None:
    """None when the peer's signature over this request is valid, else the 401 to send. The
    signature covers the full path, so it cannot be replayed on another URL."""
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > MAX_REQUEST_BYTES:
        missing = "a forwarded request needs a content-length"
        return error_response(AuthenticationError(missing, code=BAD_SIGNATURE))
    body = await request.body() if request.method == "POST" else b""
    why = verify(
        secret,
        request.headers.get(SIGNATURE),
        request.headers.get(FORWARDED_FROM),
        request.scope["path"],
        body,
    )
    return None if why is None else error_response(AuthenticationError(why, code=BAD_SIGNATURE))
