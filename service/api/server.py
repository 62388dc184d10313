"""The HTTP/1.1 protocol segment-service runs: uvicorn's h11 protocol with two gaps closed.

uvicorn's h11 protocol (as of 0.54) leaves two gaps that the application never sees:

- **Slow request heads.** ``timeout_keep_alive`` only runs between requests (not before the
  first) and is cancelled by the first byte that arrives; a client that drips a request line
  and headers a byte at a time, or sends nothing, holds its connection (and a file descriptor)
  for ever, before the app, its API key check or its upload timeouts see anything. Here the
  head must be complete within ``SEG_HEADER_TIMEOUT_S`` of the connection opening, or of the
  previous response finishing on a keep-alive connection; otherwise the connection is
  answered 408 (when part of a head arrived) and closed.
- **Malformed requests.** h11 refuses a bad request line, a bad header or a head over its size
  limit, and uvicorn answers a plain-text 400 of its own. Here that answer is the service's JSON
  error body ``{"detail", "code": "bad_request", "request_id"}`` with ``X-Request-ID``, like
  every other error, and the request ID is logged.

Used by :func:`service.main.run` and :mod:`bench.live_server` (``--http
service.api.server:ServiceH11Protocol``); the Ray Serve ingress runs behind Ray's own proxy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol
from uvicorn.server import ServerState

from service.core.config import settings_from_env
from service.core.logs import request_id_var

log = logging.getLogger("service")

# Codes of the service's ErrorCode (service/api/problems.py), spelled out so that this module
# needs nothing of the app: the protocol answers before any of it runs.
BAD_REQUEST = "bad_request"
TOO_SLOW = "upload_timeout"  # the request arrived too slowly: its head here, its body there

MALFORMED = (
    "the request is not valid HTTP/1.1 (request line, a header, or a head over the size limit); "
    "nothing was processed"
)


class ServiceH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head timeout and JSON answers to protocol errors.

    The head timer runs while the connection waits for a request head: from the connection
    opening, and from the end of each response (keep-alive idle time counts, so an idle
    connection is also closed after ``header_timeout_s`` when that is shorter than uvicorn's
    ``timeout_keep_alive``). It stops once h11 has parsed a complete head; the body's own
    limits (``SEG_UPLOAD_TIMEOUT_S``, ``SEG_MIN_UPLOAD_RATE``) take over from there.
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.header_timeout_s = settings_from_env().header_timeout_s
        self.head_timer: asyncio.TimerHandle | None = None

    # --- the head timer -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start the head timer as the connection opens (a silent connection is cut too)."""
        super().connection_made(transport)  # type: ignore[arg-type]
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        """Parse as uvicorn does, then stop the head timer once a whole head has arrived.

        Bytes that arrive do not restart it: dripping a head keeps nothing alive.
        """
        super().data_received(data)
        self._watch_head()

    def on_response_complete(self) -> None:
        """After a response on a kept-alive connection the next head gets its own timer."""
        super().on_response_complete()
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        """Drop the timer with the connection."""
        self._stop_head_timer()
        super().connection_lost(exc)

    def _waiting_for_head(self) -> bool:
        """No request is being worked on: h11 has no complete head, or the response is
        already sent and what still arrives is the rest of a body nobody reads."""
        return self.conn.their_state is h11.IDLE or self.conn.our_state is h11.DONE

    def _watch_head(self) -> None:
        """Arm the head timer while waiting for a head (never re-arming it), else stop it."""
        if self.transport.is_closing() or not self._waiting_for_head():
            self._stop_head_timer()
        elif self.head_timer is None:
            self.head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        """408 with the JSON body if part of a head arrived and no response was started, else
        just close, as uvicorn's keep-alive timeout does."""
        self.head_timer = None
        if self.transport.is_closing():
            return
        partial_head, _ = self.conn.trailing_data
        if partial_head and self.conn.our_state is h11.IDLE:
            message = (
                f"the request head did not arrive within {self.header_timeout_s:g} s "
                "(SEG_HEADER_TIMEOUT_S); the connection is closed"
            )
            self._send_error(408, TOO_SLOW, message)
        else:
            self.transport.close()

    # --- protocol errors ------------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse (``msg`` is its plain-text body),
        as the service's JSON error body instead."""
        self._send_error(400, BAD_REQUEST, MALFORMED)

    def _send_error(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` with the service's JSON error body ``{detail, code, request_id}``
        and a fresh request ID, then close.

        Written through h11, which allows a response while the client's request is
        incomplete or broken; if a response was already started there is nothing valid left
        to send, and the connection is only closed.
        """
        rid = uuid.uuid4().hex
        token = request_id_var.set(rid)
        try:
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
            log.info("%s: %d %s", client, status, message)
        finally:
            request_id_var.reset(token)
        doc = {"detail": message, "code": code, "request_id": rid}
        body = json.dumps(doc, separators=(",", ":")).encode()
        headers = [
            *self.server_state.default_headers,
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", rid.encode()),
            (b"connection", b"close"),
        ]
        try:
            for event in (
                h11.Response(status_code=status, headers=headers, reason=STATUS_PHRASES[status]),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event) or b"")
        except h11.LocalProtocolError:
            pass  # a response was already under way on this connection
        self.transport.close()
