"""aiohttp's connection layer for the REST server (deploy/serving/rest.py): HTTP/1.1 protocol
errors answered in TF Serving's JSON, a malformed chunk delivered to the body it breaks, and
the connection cap (connections over it answered 503 at once, never read).

`JsonErrorConnection.data_received` reads aiohttp's private `_messages` queue of parsed
messages: aiohttp is pinned (constraints.txt) for that reason, and
`test_a_malformed_chunk_after_the_headers_is_400_at_once` (tests/deploy/test_serving_hostile.py)
fails if the queue changes shape.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from http import HTTPStatus

from aiohttp import web
from aiohttp.http import RawRequestMessage

from deploy.serving.codec import RequestError

log = logging.getLogger("kcp.serve")
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b'Content-Length: 50\r\n\r\n{"error": "too many connections; try again later"}')


class BodyError(RequestError):
    """A body that cannot be read safely: answered, then the connection is closed."""


def json_response(code: int, data: bytes, close: bool = False) -> web.Response:
    response = web.Response(status=code, body=data, content_type="application/json")
    if close:
        response.force_close()
    return response


class JsonErrorConnection(web.RequestHandler):
    """aiohttp's HTTP/1.1 connection, with protocol errors answered in JSON, and a framing error
    in a body (a malformed chunk) delivered to that body: aiohttp queues its 400 behind the
    request and would leave the body waiting for bytes that never come."""

    last_body = None  # the body of the newest request parsed on this connection

    def handle_error(self, request, status=500, exc=None, message=None):
        if status >= 500:
            log.error("serve: internal error", exc_info=exc)
            text = "internal error"
        else:
            text = (message or HTTPStatus(status).phrase).splitlines()[0].rstrip(":")
            if text.startswith("Too many headers"):
                status = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
            log.debug("serve: bad request from %s: %s", request.remote, text)
        return json_response(status, json.dumps({"error": text}).encode(), close=True)

    def data_received(self, data: bytes) -> None:
        queued = len(self._messages)
        super().data_received(data)
        for message, body in itertools.islice(self._messages, queued, None):
            if isinstance(message, RawRequestMessage):
                self.last_body = body
            elif self.last_body is not None and not self.last_body.is_eof():  # a parse error inside that body
                reason = message.message.splitlines()[0].rstrip(":")
                self.last_body.set_exception(BodyError(f"malformed request body: {reason}"))


class BusyConnection(asyncio.Protocol):
    """A connection over the cap: answered 503 at once, never read, closed within a second."""

    def connection_made(self, transport):
        transport.write(BUSY)
        transport.write_eof()  # the answer, then FIN; what the client sends meanwhile is discarded
        self.timer = asyncio.get_running_loop().call_later(1.0, transport.abort)

    def data_received(self, data):
        pass

    def connection_lost(self, exc):
        self.timer.cancel()


class CappedServer(web.Server):
    """aiohttp's low-level server with the connection cap: the protocol factory hands out
    `JsonErrorConnection`s while fewer than `max_connections` are open, `BusyConnection` after."""

    def __init__(self, handler, max_connections: int, max_request_bytes: int, **kwargs):
        super().__init__(handler, request_factory=self._request, **kwargs)
        self.max_connections, self.max_request_bytes, self.open = max_connections, max_request_bytes, 0

    def _request(self, message, payload, protocol, writer, task):
        return web.BaseRequest(message, payload, protocol, writer, task, self._loop,
                               client_max_size=self.max_request_bytes)

    def __call__(self):
        if self.open >= self.max_connections:
            return BusyConnection()
        self.open += 1
        return JsonErrorConnection(self, loop=self._loop, **self._kwargs)

    def connection_lost(self, handler, exc=None):
        self.open -= 1
        super().connection_lost(handler, exc)
