"""Logging: request ids on every line, an access log of our own, and ``text`` or ``json`` lines.

The request id lives in a context variable that the :class:`app.middleware.RequestContext`
middleware sets for each request; :class:`RequestIdFilter` copies it onto every record, so any
``logging`` call made while serving a request (in its task, or in a thread started with its context)
carries it without being passed around. Lines the model thread writes for a batch serve many
requests at once and carry no id.

No review text is ever logged: the access line carries how many texts a request had, never what
they said, and errors name texts by index.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar, Token
from datetime import datetime, timezone
from typing import IO, Any, Literal

LogFormat = Literal["text", "json"]

# The request being served (set by the RequestContext middleware, one per request task).
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
# What the routes tell the access log about the request (a mutable dict shared with the middleware).
_request_fields: ContextVar[dict[str, Any] | None] = ContextVar("request_fields", default=None)

ACCESS_LOGGER = "app.access"
# Fields of an access record, in the order the JSON line lists them.
ACCESS_FIELDS = ("method", "route", "status", "duration_ms", "texts", "client", "trace_id")
LEVELS = {"critical": logging.CRITICAL, "error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO,
          "debug": logging.DEBUG, "trace": 5}  # "trace" is uvicorn's level below DEBUG

access_log = logging.getLogger(ACCESS_LOGGER)


def bind_request(request_id: str) -> tuple[dict[str, Any], Token, Token]:
    """Make ``request_id`` the current request's id; returns the request's field dict and the
    tokens that :func:`unbind_request` takes."""
    fields: dict[str, Any] = {}
    return fields, request_id_var.set(request_id), _request_fields.set(fields)


def unbind_request(id_token: Token, fields_token: Token) -> None:
    request_id_var.reset(id_token)
    _request_fields.reset(fields_token)


def note_texts(count: int) -> None:
    """Record how many texts the current request carries (for its access line and its span).
    A prediction route calls this once it has parsed the body; outside a request it does nothing."""
    fields = _request_fields.get()
    if fields is not None:
        fields["texts"] = count


def note_explained() -> None:
    """Mark the current request as asking for explanations: its latency is labelled apart, since
    an explanation costs about one prediction per token (see app.middleware.RequestTimer)."""
    fields = _request_fields.get()
    if fields is not None:
        fields["explain"] = True


def request_fields() -> dict[str, Any]:
    """What the routes recorded about the current request (empty outside a request)."""
    return _request_fields.get() or {}


class RequestIdFilter(logging.Filter):
    """Puts the current request's id (or None) on every record as ``record.request_id``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        return True


class TextFormatter(logging.Formatter):
    """``2026-01-02 10:11:12,345 INFO app.access [3f2a…] POST /v1/predict 200 …``; ``[-]`` outside a request."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "request_id", None) is None:
            record.request_id = "-"
        try:
            return super().format(record)
        finally:
            if record.request_id == "-":
                record.request_id = None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp (UTC, ISO 8601), level, logger, message, request_id,
    the access fields when the record has them, and the traceback as ``exception`` if any."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        if record.name == ACCESS_LOGGER:  # every access line has the same keys (null where not applicable)
            line.update({field: getattr(record, field, None) for field in ACCESS_FIELDS if field != "trace_id"})
            if getattr(record, "trace_id", None) is not None:  # only while tracing
                line["trace_id"] = record.trace_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(log_format: LogFormat = "text", level: str | int = "info", stream: IO[str] | None = None) -> logging.Handler:
    """Send every log line of the process (the app's, uvicorn's and Python warnings) through one
    handler on the root logger with the request-id filter and the chosen format, and turn off
    uvicorn's own access log (ours carries the request id). Safe to call again: it replaces the
    handler it installed before and leaves other handlers (pytest's) alone. Returns the handler."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_sentiment_handler", False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler._sentiment_handler = True  # type: ignore[attr-defined]
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(LEVELS[level.lower()] if isinstance(level, str) else level)
    # uvicorn's dictConfig (``uvicorn app.main:app``) gives its loggers their own handlers; send
    # their lines to ours instead. An access logger with no handler makes uvicorn skip access logging.
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
    uvicorn_access = logging.getLogger("uvicorn.access")
    uvicorn_access.handlers = []
    uvicorn_access.propagate = False
    logging.captureWarnings(True)  # warnings become log lines too: every line is JSON in json mode
    return handler
