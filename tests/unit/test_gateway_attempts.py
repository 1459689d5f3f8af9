"""The gateway's note on a failed region attempt (app.serving.gateway._log_attempt): a local
refusal (an APIError, whose `body` is a method) and a busy peer's answer (bytes) both log, and
neither raises, since it runs while the request moves on to the next region."""

from __future__ import annotations

import logging

import pytest

from app.api.errors import OverloadedError
from app.regions.forwarding import PeerBusyError, PeerUnreachableError
from app.serving.gateway import LOCAL, _log_attempt


def test_every_kind_of_failed_attempt_is_logged_without_raising(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logging.getLogger("app").propagate = True  # a configured app logger may stop at itself
    with caplog.at_level(logging.WARNING, logger="app.serving.gateway"):
        _log_attempt("echo", LOCAL, OverloadedError("at capacity", retry_after_s=1))
        _log_attempt("echo", "eu-west-1", PeerBusyError(503, b'{"error": "busy"}'))
        _log_attempt("echo", "eu-west-1", PeerUnreachableError("refused"))
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3
    assert "this region" in messages[0] and "busy" in messages[1]
