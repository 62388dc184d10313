"""Logging with the request ID on every line, so an error a user reports can be found.

Two formats (``SEG_LOG_FORMAT``):

- ``text`` (default): one plain line per record on the ``service`` logger; uvicorn keeps its own.
- ``json``: one JSON object per line for the service's records and uvicorn's alike (server,
  error and access log), for Loki, ELK and friends: ``time``, ``level``, ``logger``,
  ``message``, ``request_id``. A request's access line adds ``method``, ``path``, ``query``,
  ``status``, ``duration_ms`` (until the response started) and ``client``, and what the route
  reported about its work (``/segment``: ``model``, ``tiles``, ``bytes``).
"""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
# Per request: when it arrived and what its route reported (set by RequestIdMiddleware).
request_fields_var: ContextVar[dict[str, Any] | None] = ContextVar("request_fields", default=None)

_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


def start_request() -> dict[str, Any]:
    """A fresh record of the current request's fields; the access line reads it."""
    fields: dict[str, Any] = {"_start": time.perf_counter()}
    request_fields_var.set(fields)
    return fields


def log_fields(**fields: Any) -> None:
    """Add ``fields`` to the current request's access line (JSON logs), e.g. the model used."""
    current = request_fields_var.get()
    if current is not None:
        current.update(fields)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record; uvicorn's access records become structured request lines."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", request_id_var.get()),
        }
        if record.name == "uvicorn.access" and isinstance(record.args, tuple):
            # uvicorn logs '%s - "%s %s HTTP/%s" %d' with these arguments when a response starts.
            client, method, target, _version, status = record.args
            path, _, query = str(target).partition("?")
            doc.update(method=method, path=path, query=query, status=status, client=client)
            fields = dict(request_fields_var.get() or {})
            start = fields.pop("_start", None)
            if start is not None:
                doc["duration_ms"] = round((time.perf_counter() - start) * 1000.0, 3)
            doc.update(fields)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def _handler(fmt: LogFormat) -> logging.Handler:
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    return handler


def configure_logging(level: str, fmt: LogFormat = "text") -> None:
    """The service's log on stderr at ``level``, and uvicorn's through the same handler: every
    line, uvicorn's access lines included, carries the request ID (``-`` outside a request)."""
    root = logging.getLogger("service")
    root.handlers[:] = [_handler(fmt)]
    root.setLevel(level.upper())
    root.propagate = False
    for name in _UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [_handler(fmt)]
        logger.propagate = False
