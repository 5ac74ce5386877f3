"""The HTTP side: TF Serving's REST routes (routes.py) over a ModelRegistry, served by aiohttp.

aiohttp's low-level server parses HTTP (llhttp, in C): request lines, headers, Content-Length
and chunked framing, pipelining; a message it cannot parse is answered 400 (431 for too many
headers) with {"error": ...} and the connection closed. On top of it: a body larger than
`max_request_bytes` is 413 (a declared Content-Length before anything is read, a chunked body
as soon as it passes the limit, a gzip body, decoded here as TF Serving decodes it, as soon as the
decoded bytes pass it; another Content-Encoding is 415, aiohttp's own decoding being off); a connection that sends no complete request for
`idle_timeout_s`, or whose body has not arrived `idle_timeout_s` after its headers, is closed;
connections beyond `max_connections` are answered 503 at once (JSON nested deeper than
routes.MAX_JSON_DEPTH is 400). With batching on, a POST body up to INLINE_BODY_BYTES is decoded and its
answer encoded on the event loop, and its model call awaited in the batcher, so no thread is
handed the request (1.6-1.8x the batched throughput at 32 clients on a text RNN); larger
bodies, GETs and unbatched calls are decoded, run and encoded in a thread pool (one thread per
request in progress).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus

from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.web_protocol import RequestPayloadError

from deploy.serving.connection import BodyError, CappedServer, json_response
from deploy.serving.registry import ModelRegistry
from deploy.serving.routes import respond, respond_inline
from kcp.core.errors import UserError
from kcp.core.layout import RunLayout

log = logging.getLogger("kcp.serve")
STOP_GRACE_S = 5.0  # what `request_stop` (kcp serve on SIGINT or SIGTERM) gives requests in progress
MIN_POLL_SECONDS = 0.1  # a faster rescan of RUN/export/ only burns CPU
# POST bodies up to this size are answered on the event loop (decoding them takes well under a
# millisecond), their model call awaited in the batcher; larger ones, and all GETs, in the pool
INLINE_BODY_BYTES = 64 * 1024


class RestServer:
    """TF Serving's REST API on aiohttp. Bound at construction (`server_address`); `serve_forever()`
    runs it on an event loop in the calling thread until `shutdown()` from another thread, or
    `request_stop()` from anywhere (a signal handler too); `server_close()` stops the gRPC server
    and the registry's scanner and frees the port."""

    def __init__(self, registry: ModelRegistry, host: str, port: int, *, max_request_bytes: int,
                 max_connections: int, idle_timeout_s: float):
        self.registry, self.grpc = registry, None
        self.max_request_bytes, self.max_connections, self.idle_timeout_s = (max_request_bytes, max_connections,
                                                                             idle_timeout_s)
        self.stop = threading.Event()  # ends the registry's scanner
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):  # said plainly, not as bind's "Unknown error -2"
            raise UserError(f"--host: cannot resolve host {host!r}") from None
        try:
            self.socket = socket.create_server((host, port), backlog=128)  # 128: bursts of clients are not reset
        except OSError as error:
            reason = os.strerror(error.errno) if error.errno else str(error)
            raise UserError(f"--port {port}: cannot bind {host}:{port}: {reason}") from None
        self.server_address = self.socket.getsockname()[:2]
        # one thread per request in progress (at most one per connection): waiting requests meet in the batcher
        self.pool = ThreadPoolExecutor(max_workers=max_connections, thread_name_prefix="kcp-rest")
        self._lock = threading.RLock()  # reentrant: request_stop may run in a signal handler of the serving thread
        self._grace = 1.0  # seconds requests in progress get when the server stops
        self.stop_grace_s = STOP_GRACE_S  # request_stop's default
        self._in_progress = 0  # requests being read or answered (touched on the event loop only)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._shutdown_requested = False
        self._stopped = threading.Event()
        self._stopped.set()

    # ---- life cycle

    def serve_forever(self, poll_interval: float = 0.5) -> None:  # noqa: ARG002  (socketserver's signature)
        """Serves until shutdown() (or KeyboardInterrupt)."""
        with self._lock:
            if self._shutdown_requested:
                return
            self._stopped.clear()
        try:
            asyncio.run(self._serve())
        finally:
            self._stopped.set()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        server = CappedServer(self._handle, self.max_connections, self.max_request_bytes,
                            keepalive_timeout=self.idle_timeout_s,  # idle, or headers unfinished: closed
                            lingering_time=0, access_log=None, auto_decompress=False)
        listener = await loop.create_server(server, sock=self.socket, backlog=128)
        with self._lock:
            self._loop, self._stopping = loop, asyncio.Event()
            if self._shutdown_requested:
                self._stopping.set()
        try:
            await self._stopping.wait()
        finally:
            listener.close()  # no new connections
            if self.grpc is not None:  # no new calls; those in progress get the same grace, meanwhile
                self.grpc.stop(self._grace, wait=False)
            # requests in progress finish, a body still arriving included (aiohttp's shutdown would stop
            # reading it); after the grace, or once none is left, aiohttp closes the connections
            deadline = loop.time() + self._grace
            while self._in_progress and loop.time() < deadline:
                await asyncio.sleep(0.02)
            # aiohttp waits without a limit for a timeout of 0 (ceil_timeout): past the grace, it gets a
            # moment to cancel the handlers still running and close their connections
            await server.shutdown(max(0.05, deadline - loop.time()))
            with self._lock:
                self._loop = None

    def request_stop(self, grace: float | None = None) -> None:
        """Asks serve_forever to stop and returns at once (safe in a signal handler): it stops
        accepting connections and gRPC calls, lets requests in progress finish within `grace`
        seconds (default `stop_grace_s`), and returns; then call server_close."""
        with self._lock:
            self._grace = self.stop_grace_s if grace is None else grace
            self._shutdown_requested = True
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._stopping.set)

    def shutdown(self, grace: float = 1.0) -> None:
        """Stops serve_forever and waits for it to return (requests in progress get `grace` seconds)."""
        self.request_stop(grace)
        self._stopped.wait()

    def server_close(self) -> None:
        """Releases everything after shutdown(): the scanner, gRPC, the socket, the thread pool, and the
        loaded versions with their batching threads (a notebook may start many servers)."""
        self.stop.set()
        if self.grpc is not None:
            self.grpc.stop(grace=self._grace)
        self.socket.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.registry.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        """`with kcp.Run(...).serve() as server:` stops and releases it at the end of the block."""
        self.shutdown()
        self.server_close()

    # ---- one request

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        if not request.body_exists:
            return b""
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("gzip", "identity"):  # TF Serving decodes gzip only; aiohttp would decode others
            raise BodyError(f"Content-Encoding {encoding!r} is not supported; send gzip or an uncompressed body",
                            HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
        length = request.content_length  # aiohttp has rejected malformed and conflicting ones
        if length is not None and length > self.max_request_bytes:  # refused before a byte is read
            raise BodyError(f"request body of {length} bytes exceeds the limit of {self.max_request_bytes}",
                            HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        if request.version == HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits a second for it
            request.writer.output_size = 0
        try:
            raw = await asyncio.wait_for(request.read(), self.idle_timeout_s)
        except web.HTTPRequestEntityTooLarge:  # a chunked body past client_max_size
            raise BodyError(f"request body exceeds the limit of {self.max_request_bytes} bytes",
                            HTTPStatus.REQUEST_ENTITY_TOO_LARGE) from None
        except RequestPayloadError as error:
            reason = [line.strip() for line in str(error).splitlines() if line.strip()][-1]
            raise BodyError(f"cannot decode the request body: {reason}", HTTPStatus.BAD_REQUEST) from None
        return self._gunzip(raw) if encoding == "gzip" else raw

    def _gunzip(self, raw: bytes) -> bytes:
        """A gzip body decoded here, not by aiohttp's parser (auto_decompress is off): its parser
        would try every encoding it knows before our 415 (brotli: "Please install Brotli"), and
        answer a short deflate body with the word "deflate". No more than the limit is inflated."""
        decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            body = decoder.decompress(raw, self.max_request_bytes + 1)
            if len(body) > self.max_request_bytes or decoder.unconsumed_tail:
                raise BodyError(f"request body exceeds the limit of {self.max_request_bytes} bytes once decoded",
                                HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            if not decoder.eof:
                raise zlib.error("incomplete or truncated stream")
        except zlib.error as error:
            raise BodyError(f"cannot decode the request body: not gzip ({error})", HTTPStatus.BAD_REQUEST) from None
        return body

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self._in_progress += 1
        try:
            return await self._answer(request)
        finally:
            self._in_progress -= 1

    async def _answer(self, request: web.BaseRequest) -> web.StreamResponse:
        close = False
        try:
            raw = await self._read_body(request)
        except BodyError as error:
            code, data, close = error.status, json.dumps({"error": str(error)}).encode(), True
        except (asyncio.TimeoutError, ConnectionError):  # too slow, or gone: no answer
            request.protocol.force_close()
            return web.Response(status=HTTPStatus.REQUEST_TIMEOUT)  # never sent: the connection is closed
        else:
            path = request.raw_path.split("?", 1)[0]
            if request.method == "POST" and self.registry.batching and len(raw) <= INLINE_BODY_BYTES:
                code, data = await respond_inline(self.registry, self.pool, request.method, path, raw)
            else:
                code, data = await asyncio.get_running_loop().run_in_executor(
                    self.pool, respond, self.registry, request.method, path, raw)
        close = close or self._shutdown_requested  # stopping: no next request on this connection
        response = json_response(code, data, close)
        try:  # written here, under the timeout, so a client that does not read cannot hold the connection
            await asyncio.wait_for(self._write(request, response), self.idle_timeout_s)
        except (asyncio.TimeoutError, ConnectionError):  # not read in time, or the client left
            close = True
        if close:
            request.protocol.force_close()  # unread body bytes are never parsed as a request
        return response

    @staticmethod
    async def _write(request: web.BaseRequest, response: web.Response) -> None:
        await response.prepare(request)
        await response.write_eof()


def check_options(port: int, grpc_port: int | None, *, max_batch_size: int, batch_timeout_ms: float,
                  max_request_bytes: int, max_connections: int, idle_timeout_s: float, poll_seconds: float) -> None:
    """UserError naming the flag and its value for a setting the server cannot run with, before
    anything is bound or loaded (kcp serve and kcp.serve both get it through make_server)."""
    def integer(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def number(value) -> bool:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)

    port_range = "a port number from 0 (a free port) to 65535"
    megabytes = f"{max_request_bytes / 2**20:g}" if number(max_request_bytes) else max_request_bytes
    checks = [("--port", port, integer(port) and 0 <= port <= 65535, port_range),
              ("--grpc-port", grpc_port, grpc_port is None or integer(grpc_port) and 0 <= grpc_port <= 65535,
               port_range),
              ("--max-connections", max_connections, integer(max_connections) and max_connections >= 1,
               "an integer, 1 or more"),
              ("--max-batch-size", max_batch_size, integer(max_batch_size) and max_batch_size >= 1,
               "an integer, 1 or more"),
              ("--batch-timeout-ms", batch_timeout_ms, number(batch_timeout_ms) and batch_timeout_ms >= 0,
               "0 or more"),
              ("--max-request-mb", megabytes, number(max_request_bytes) and max_request_bytes >= 1, "above 0"),
              ("--idle-timeout-s", idle_timeout_s, number(idle_timeout_s) and idle_timeout_s > 0, "above 0"),
              ("--poll-seconds", poll_seconds, number(poll_seconds) and poll_seconds >= MIN_POLL_SECONDS,
               f"{MIN_POLL_SECONDS} or more")]
    for flag, value, valid, allowed in checks:
        if not valid:
            raise UserError(f"{flag} {f'{value:g}' if isinstance(value, float) else value}: must be {allowed}")


def make_server(run_dir: str, host: str = "127.0.0.1", port: int = 8501, *, max_batch_size: int = 32,
                batch_timeout_ms: float = 2.0, batching: bool = True, max_request_bytes: int = 10 * 2**20,
                max_connections: int = 64, idle_timeout_s: float = 30.0, version_policy: str = "latest:1",
                allow_unvalidated: bool = False, version_labels: dict | list | None = None, poll_seconds: float = 1.0,
                grpc_port: int | None = None) -> RestServer:
    """A ready server (call serve_forever); its `registry` has the models loaded, a thread
    rescans the exports every `poll_seconds`, and with `grpc_port` (0: a free one) `server.grpc`
    answers TF Serving's gRPC API on the same registry. server_close stops all of it.

    The settings are checked, and both ports bound, before any model loads: a bad setting, a
    host that does not resolve or a port in use is a UserError at once."""
    check_options(port, grpc_port, max_batch_size=max_batch_size, batch_timeout_ms=batch_timeout_ms,
                  max_request_bytes=max_request_bytes, max_connections=max_connections,
                  idle_timeout_s=idle_timeout_s, poll_seconds=poll_seconds)
    max_request_bytes = int(max_request_bytes)  # gRPC takes an integer
    registry = ModelRegistry(RunLayout(run_dir).exports, max_batch_size, batch_timeout_ms, batching,
                             policy=version_policy, allow_unvalidated=allow_unvalidated, labels=version_labels,
                             poll_seconds=poll_seconds)
    server = RestServer(registry, host, port, max_request_bytes=max_request_bytes, max_connections=max_connections,
                        idle_timeout_s=idle_timeout_s)
    try:
        if grpc_port is not None:
            from deploy.serving.grpc import make_grpc_server

            server.grpc = make_grpc_server(registry, host, grpc_port, max_request_bytes=max_request_bytes,
                                           max_concurrent=max_connections)
        registry.scan()  # the models load now, the ports already held
    except BaseException:
        server.server_close()
        raise
    if server.grpc is not None:
        server.grpc.start()
    threading.Thread(target=registry.poll_forever, args=(server.stop,), name="kcp-serve-scan", daemon=True).start()
    return server
