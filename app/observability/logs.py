"""Request ids and request-aware log lines: the id a response carries in x-request-id, put on
every log record made while serving it (with the trace and span ids when a span is current), as
text or as JSON (APP_LOG_FORMAT=json).

Inside a Serve replica, app log records go to Serve's replica logger ("ray.serve"): one log file
per replica that `ray logs` and the dashboard know, in the encoding of the deployment's
LoggingConfig (serve_logging_config), with the request id Serve keeps for the request. Serve's
HTTP servers (its proxy, and each replica's direct ingress) take that id from the x-request-id
header as it is, or make a uuid4 when there is none, echo it in the response's x-request-id,
and pass it over handle calls; bind_request_id makes Serve's and ours agree.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import sys
import threading
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any, TypeGuard

import orjson

from app.observability.tracing import current_ids

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID_PREFIX = "req_"
MAX_REQUEST_ID_CHARS = 128
# No spaces, quotes or control characters: an id is copied into headers, log lines and JSON.
_SANE_ID = re.compile(rf"[A-Za-z0-9._:+/=@-]{{1,{MAX_REQUEST_ID_CHARS}}}")
_REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)

LOG_FORMAT_ENV = "APP_LOG_FORMAT"
LOG_LEVEL_ENV = "APP_LOG_LEVEL"
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
SERVE_LOGGER = "ray.serve"
_SERVE_CONTEXT_MODULE = "ray.serve.context"


def is_valid_request_id(value: str | None) -> TypeGuard[str]:
    return value is not None and _SANE_ID.fullmatch(value) is not None


def new_request_id(incoming: str | None = None) -> str:
    """`incoming` (a client's, a peer region's, a caller's) if it is sane, else a fresh
    `req_` + 24 hex digits."""
    if incoming is not None and _SANE_ID.fullmatch(incoming):
        return incoming
    # Not a secret, only unique: getrandbits is several times cheaper than os.urandom.
    return f"{REQUEST_ID_PREFIX}{random.getrandbits(96):024x}"


def bind_request_id(incoming: str | None) -> str:
    """This request's id, made current for its log lines: `incoming` if sane, else the id Serve
    holds for the request if sane, else a new one. Serve's request context is set to the same
    id, so handle calls made from here carry it. Each request runs in its own task, so binding
    needs no reset. Behind Serve the response already has the header (see the module doc);
    elsewhere the caller sets it from the returned id."""
    serve_id = _serve_request_id()
    if is_valid_request_id(incoming):
        request_id = incoming
    elif is_valid_request_id(serve_id):
        request_id = serve_id
    else:
        request_id = new_request_id()
    if serve_id is not None and serve_id != request_id:
        _set_serve_request_id(request_id)
    _REQUEST_ID.set(request_id)
    if incoming and incoming != request_id:  # Serve echoes the client's value in its response
        logger.info(
            "x-request-id %.80r is not a sane id; logging this request as %s", incoming, request_id
        )
    return request_id


def current_request_id() -> str | None:
    return _REQUEST_ID.get()


def _serve_request_id() -> str | None:
    """The request id in Serve's request context; None outside a Serve request. Serve's context
    is private API (ray.serve.context, pinned Ray 2.60): read only if Serve is loaded."""
    module = sys.modules.get(_SERVE_CONTEXT_MODULE)
    variable = getattr(module, "_serve_request_context", None)
    context = variable.get() if variable is not None else None
    return getattr(context, "request_id", None) or None


def _set_serve_request_id(request_id: str) -> None:
    variable = sys.modules[_SERVE_CONTEXT_MODULE]._serve_request_context
    variable.set(dataclasses.replace(variable.get(), request_id=request_id))


class RequestContextFilter(logging.Filter):
    """Adds `request_id`, and `trace_id` and `span_id` when a span is current, to each record
    made while a request is served; filters nothing out. Attach it to handlers: a logger's own
    filters do not see records propagated from its children."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = _REQUEST_ID.get()
        if request_id is not None:
            record.request_id = request_id
        ids = current_ids()
        if ids is not None:
            record.trace_id, record.span_id = ids
        return True


def text_formatter() -> logging.Formatter:
    """`time LEVEL logger [request id] message`, with `-` for a record outside any request."""
    return logging.Formatter(TEXT_FORMAT, defaults={"request_id": "-"})


# Attributes every LogRecord has; anything else on a record came from `extra=` or a filter.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, trace_id and span_id
    when known, exc_info, and every `extra=` field."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS:
                line.setdefault(key, value)
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        try:
            return orjson.dumps(line, default=str).decode()
        except TypeError:  # an extra orjson cannot encode even as str (an int over 64 bits)
            return orjson.dumps({k: str(v) for k, v in line.items()}).decode()


class ServeRelayHandler(logging.Handler):
    """Hands records to Serve's replica logger, which writes the replica's log file in the
    deployment's encoding and adds its own fields (deployment, replica, route, request_id)."""

    def emit(self, record: logging.LogRecord) -> None:
        serve_logger = logging.getLogger(SERVE_LOGGER)
        if serve_logger.isEnabledFor(record.levelno):
            serve_logger.handle(record)


def log_format(value: str | None = None) -> str:
    """`value`, else APP_LOG_FORMAT, else text; anything but text or json is an error."""
    chosen = (value or os.environ.get(LOG_FORMAT_ENV) or "text").lower()
    if chosen not in LOG_FORMATS:
        raise ValueError(f"{LOG_FORMAT_ENV} must be one of {LOG_FORMATS}, not {chosen!r}")
    return chosen


def log_level(value: str | int | None = None) -> int:
    """`value`, else APP_LOG_LEVEL, else INFO, as a logging level number."""
    chosen = value if value is not None else os.environ.get(LOG_LEVEL_ENV) or "INFO"
    level = chosen if isinstance(chosen, int) else logging.getLevelName(chosen.upper())
    if not isinstance(level, int):
        raise ValueError(f"{LOG_LEVEL_ENV} must be a logging level name, not {chosen!r}")
    return level


_installed: dict[str, logging.Handler] = {}  # per logger name: the handler installed there
_install_lock = threading.Lock()


def configure_logging(
    fmt: str | None = None,
    level: str | int | None = None,
    *,
    logger_name: str = "app",
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Give `logger_name`'s records (the app's modules log under "app.") one handler with the
    request context filter; calling again replaces it, never adds a second.

    In a Serve replica (and no `stream` given) the handler relays to Serve's replica logger, and
    the format is the deployment's LoggingConfig (serve_logging_config); elsewhere it writes
    text or JSON lines to `stream` (default stderr). Records stop at this logger (no
    propagation), so no line is written twice."""
    chosen_format, chosen_level = log_format(fmt), log_level(level)
    handler: logging.Handler
    if stream is None and _in_serve_replica():
        handler = ServeRelayHandler()
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JSONFormatter() if chosen_format == "json" else text_formatter())
    handler.addFilter(RequestContextFilter())
    target = logging.getLogger(logger_name)
    with _install_lock:
        previous = _installed.get(logger_name)
        if previous is not None:
            target.removeHandler(previous)
        target.addHandler(handler)
        target.setLevel(chosen_level)
        target.propagate = False
        _installed[logger_name] = handler
    return handler


def serve_logging_config(fmt: str | None = None, level: str | int | None = None) -> dict[str, Any]:
    """The `logging_config` for our deployments (ray.serve.schema.LoggingConfig as a dict): JSON
    replica logs when APP_LOG_FORMAT=json, with each record's logger name."""
    return {
        "encoding": "JSON" if log_format(fmt) == "json" else "TEXT",
        "log_level": logging.getLevelName(log_level(level)),
        "additional_log_standard_attrs": ["name"],
    }


def _in_serve_replica() -> bool:
    if "ray.serve" not in sys.modules:
        return False
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        serve.get_replica_context()
    except RayServeException:
        return False
    return True
