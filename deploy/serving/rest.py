"""The HTTP side: TF Serving's REST routes over a ModelRegistry, and the server that binds them.

Routes and error answers follow tensorflow/serving's http_rest_api_handler.cc (its two
path patterns; anything else under /v1/ is 400 "Malformed request", outside /v1/ 404).
The standard library's HTTP server is kept, hardened against hostile clients: the body's
size is checked before anything is read (Content-Length must be digits; chunked bodies are
decoded with the same limit), idle and slow connections time out, connections beyond
`max_connections` get 503 without a thread, and JSON nested deeper than MAX_JSON_DEPTH is 400.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import tensorflow as tf

from deploy.serving.codec import (RequestError, error_message, format_predictions, input_specs, metadata,
                                  parse_predict_body, status)
from deploy.serving.registry import ModelRegistry
from kcp.core.layout import RunLayout

log = logging.getLogger("kcp.serve")
_SPEC = r"(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
PREDICT = re.compile(r"/v1/models/(?P<name>[^/:]+)" + _SPEC + r":(?P<method>classify|regress|predict)", re.I)
STATUS = re.compile(r"/v1/models(?:/(?P<name>[^/:]+))?" + _SPEC + r"(?:/(?P<metadata>metadata))?", re.I)
MAX_JSON_DEPTH = 64
INT64_MAX = 2**63 - 1


def json_depth(raw: bytes) -> int:
    """The deepest nesting of [ and { outside strings; vectorised, about 0.1-0.2 s for 10 MB on
    2 cores (json.loads itself takes 0.03 s), and only for bodies with over 64 brackets."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return 0
    # escaped backslashes, then escaped quotes, go first: the quotes left delimit strings
    codes = np.frombuffer(raw.replace(b"\\\\", b"").replace(b'\\"', b""), np.uint8)
    outside = (np.cumsum(codes == ord('"'), dtype=np.uint8) & 1) == 0  # uint8 wraps, parity survives
    folded = codes | 0x20  # [ and ] fold onto { and }
    brackets = folded[((folded == ord("{")) | (folded == ord("}"))) & outside]
    steps = np.where(brackets == ord("{"), 1, -1).astype(np.int32)
    return int(np.cumsum(steps).max()) if steps.size else 0


class BodyError(RequestError):
    """A body that cannot be read safely: answered, then the connection is closed."""


def make_handler(registry: ModelRegistry, max_request_bytes: int, idle_timeout_s: float):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # headers and body go out as separate writes: with Nagle's algorithm on, each response
        # waited for the client's delayed ACK (~40 ms at one client, measured)
        disable_nagle_algorithm = True
        timeout = idle_timeout_s  # the socket timeout: idle keep-alive and slow clients are dropped

        def log_message(self, format, *args):  # noqa: A002  (BaseHTTPRequestHandler's signature)
            log.debug("serve: " + format, *args)

        def _send(self, code: int, payload: dict, close: bool = False) -> None:
            data = json.dumps(payload).encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)

        def send_error(self, code, message=None, explain=None):
            """The standard library's protocol errors (bad request line, headers too long or too
            many, unknown method) as JSON like every other answer, and the connection closed."""
            if self.request_version == "HTTP/0.9":  # an unparsable request line: answer with headers anyway
                self.request_version = "HTTP/1.1"
            self._send(code, {"error": message or HTTPStatus(code).phrase}, close=True)

        def _too_large(self, size: int) -> BodyError:
            return BodyError(f"request body of {size} bytes exceeds the limit of {max_request_bytes}",
                             HTTPStatus.REQUEST_ENTITY_TOO_LARGE)

        def _read_chunked(self) -> bytes:
            body = bytearray()
            while True:
                line = self.rfile.readline(1026)
                size_text = line.split(b";", 1)[0].strip()
                if not line.endswith(b"\n") or not re.fullmatch(rb"[0-9a-fA-F]{1,15}", size_text):
                    raise BodyError("malformed chunked body")
                size = int(size_text, 16)
                if size == 0:
                    for _ in range(100):  # trailers, up to the blank line
                        if self.rfile.readline(8194) in (b"\r\n", b"\n", b""):
                            return bytes(body)
                    raise BodyError("malformed chunked body: too many trailers")
                if len(body) + size > max_request_bytes:
                    raise self._too_large(len(body) + size)
                chunk = self.rfile.read(size)
                if len(chunk) < size or self.rfile.readline(3) not in (b"\r\n", b"\n"):
                    raise BodyError("malformed chunked body")
                body += chunk

        def _read_body(self) -> bytes:
            encoding = self.headers.get_all("Transfer-Encoding") or []
            lengths = self.headers.get_all("Content-Length") or []
            if encoding:
                if lengths:  # both: a request smuggling attempt or a broken client
                    raise BodyError("both Transfer-Encoding and Content-Length")
                if [e.strip().lower() for e in ",".join(encoding).split(",")] != ["chunked"]:
                    raise BodyError(f"unsupported Transfer-Encoding: {','.join(encoding)}", HTTPStatus.NOT_IMPLEMENTED)
                return self._read_chunked()
            if not lengths:
                return b""
            if len(set(v.strip() for v in lengths)) != 1 or not re.fullmatch(r"\d{1,19}", lengths[0].strip()):
                raise BodyError(f"invalid Content-Length: {','.join(lengths)}")
            length = int(lengths[0])
            if length > max_request_bytes:
                raise self._too_large(length)  # answered without reading; the connection is closed
            raw = self.rfile.read(length)
            if len(raw) < length:
                raise BodyError("request body shorter than its Content-Length")
            return raw

        def _handle(self, method: str) -> None:
            try:
                raw = self._read_body()
            except BodyError as error:
                self._send(error.status, {"error": str(error)}, close=True)
                return
            except (TimeoutError, socket.timeout):
                self.close_connection = True
                return
            path = self.path.split("?", 1)[0]
            try:
                self._send(HTTPStatus.OK, self._answer(method, path, raw))
            except RequestError as error:
                self._send(error.status, {"error": str(error)})
            except (tf.errors.InvalidArgumentError, ValueError, TypeError) as error:
                # TF rejects inputs it cannot use with many types
                self._send(HTTPStatus.BAD_REQUEST, {"error": error_message(error)})
            except RecursionError:
                self._send(HTTPStatus.BAD_REQUEST, {"error": "JSON Parse error: nested too deep"})
            except Exception as error:  # noqa: BLE001
                log.exception("serve: internal error")
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(error).__name__}"})

        def _answer(self, method: str, path: str, raw: bytes) -> dict:
            if not path.lower().startswith("/v1/"):
                raise RequestError(f"no such endpoint: {path}", HTTPStatus.NOT_FOUND)
            match = PREDICT.fullmatch(path) if method == "POST" else STATUS.fullmatch(path) if method == "GET" else None
            if match is None:
                raise RequestError(f"Malformed request: {method} {path}")
            name, version, label = match.group("name"), match.group("version"), match.group("label")
            if version is not None and int(version) > INT64_MAX:
                raise RequestError(f"Failed to convert version: {version} to numeric.")
            if method == "GET":
                if not name:
                    raise RequestError("Missing model name in request.")
                if match.group("metadata"):
                    loaded = registry.get(name, version, label)
                    return metadata(name, loaded.version, loaded.signatures)
                return status(registry.status(name, version, label))
            return self._post(name, version, label, match.group("method").lower(), raw)

        def _post(self, name, version, label, method, raw) -> dict:
            if not raw.strip():
                raise RequestError("JSON Parse error: The document is empty")
            if json_depth(raw) > MAX_JSON_DEPTH:
                raise RequestError(f"JSON Parse error: nested deeper than {MAX_JSON_DEPTH} levels")
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise RequestError(f"JSON Parse error: {error}") from None
            if not isinstance(body, dict):
                raise RequestError("JSON Parse error: the request body must be a JSON object")
            loaded = registry.get(name, version, label)
            signature = body.get("signature_name") or "serving_default"
            function = loaded.signature(signature)
            if method == "predict":
                inputs, form = parse_predict_body(body, input_specs(function))
                return format_predictions(registry.call(loaded, signature, inputs), form)
            if method == "regress":  # TF Serving's answer for a signature that is not a regression one
                raise RequestError("Expected regression signature method_name to be tensorflow/serving/regress. "
                                   "Was: tensorflow/serving/predict")
            examples = body.get("examples")
            if not isinstance(examples, list) or not examples:
                raise RequestError("'examples' must be a non-empty list")
            inputs, _ = parse_predict_body({"instances": examples}, input_specs(function))
            outputs = registry.call(loaded, signature, inputs)
            return {"results": [[[cls, float(p)] for cls, p in zip(loaded.class_names, row)]
                                for row in outputs["probabilities"]]}

        def do_GET(self):  # noqa: N802
            self._handle("GET")

        def do_POST(self):  # noqa: N802
            self._handle("POST")

        def do_PUT(self):  # noqa: N802
            self._handle("PUT")

        def do_DELETE(self):  # noqa: N802
            self._handle("DELETE")

        def do_PATCH(self):  # noqa: N802
            self._handle("PATCH")

    return Handler


BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b'Content-Length: 50\r\n\r\n{"error": "too many connections; try again later"}')


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default listen backlog of 5 resets bursts of concurrent clients
    daemon_threads = True

    def __init__(self, address, handler, max_connections: int):
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(max_connections)
        self.stop = threading.Event()

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):  # a thread per connection, at most max_connections
            try:
                request.settimeout(1.0)
                request.sendall(BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def server_close(self):
        self.stop.set()
        grpc_server = getattr(self, "grpc", None)
        if grpc_server is not None:
            grpc_server.stop(grace=1.0)
        super().server_close()


def make_server(run_dir: str, host: str = "127.0.0.1", port: int = 8501, *, max_batch_size: int = 32,
                batch_timeout_ms: float = 2.0, batching: bool = True, max_request_bytes: int = 10 * 2**20,
                max_connections: int = 64, idle_timeout_s: float = 30.0, version_policy: str = "latest:1",
                allow_unvalidated: bool = False, version_labels: dict | list | None = None, poll_seconds: float = 1.0,
                grpc_port: int | None = None):
    """A ready HTTP server (call serve_forever); its `registry` has the models loaded, a thread
    rescans the exports every `poll_seconds`, and with `grpc_port` (0: a free one) `server.grpc`
    answers TF Serving's gRPC API on the same registry. server_close stops all of it."""
    registry = ModelRegistry(RunLayout(run_dir).exports, max_batch_size, batch_timeout_ms, batching,
                             policy=version_policy, allow_unvalidated=allow_unvalidated, labels=version_labels,
                             poll_seconds=poll_seconds)
    registry.scan()
    server = _Server((host, port), make_handler(registry, max_request_bytes, idle_timeout_s), max_connections)
    server.registry = registry
    server.grpc = None
    if grpc_port is not None:
        from deploy.serving.grpc import make_grpc_server

        server.grpc = make_grpc_server(registry, host, grpc_port, max_request_bytes=max_request_bytes,
                                       max_concurrent=max_connections)
        server.grpc.start()
    threading.Thread(target=registry.poll_forever, args=(server.stop,), name="kcp-serve-scan", daemon=True).start()
    return server
