"""The HTTP side: TF Serving's REST routes over a ModelRegistry, and the server that binds them."""

from __future__ import annotations

import json
import logging
import re
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import tensorflow as tf

from deploy.serving.codec import RequestError, format_predictions, input_specs, metadata, parse_predict_body, status
from deploy.serving.registry import ModelRegistry
from kcp.core.layout import RunLayout

log = logging.getLogger("kcp.serve")
ROUTE = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+))?(?P<rest>/metadata|:predict|:classify)?$")


def make_handler(registry: ModelRegistry, max_request_bytes: int):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # headers and body go out as separate writes: with Nagle's algorithm on, each response
        # waited for the client's delayed ACK (~40 ms at one client, measured)
        disable_nagle_algorithm = True

        def log_message(self, format, *args):  # noqa: A002  (BaseHTTPRequestHandler's signature)
            log.debug("serve: " + format, *args)

        def _send(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self):
            match = ROUTE.match(self.path.split("?", 1)[0])
            if not match:
                raise RequestError(f"no such endpoint: {self.path}", HTTPStatus.NOT_FOUND)
            return match.group("name"), match.group("version"), match.group("rest") or ""

        def do_GET(self):  # noqa: N802
            try:
                name, version, rest = self._route()
                if rest.startswith(":"):
                    raise RequestError(f"{rest[1:]} needs POST", HTTPStatus.METHOD_NOT_ALLOWED)
                loaded = registry.get(name, version)
                if rest == "/metadata":
                    self._send(HTTPStatus.OK, metadata(name, loaded.version, loaded.signatures))
                else:
                    versions = [loaded.version] if version else sorted(registry.models[name])
                    self._send(HTTPStatus.OK, status(name, versions))
            except RequestError as error:
                self._send(error.status, {"error": str(error)})

        def do_POST(self):  # noqa: N802
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length > max_request_bytes:
                    self.rfile.read(length)  # drain, so the connection stays usable
                    raise RequestError(f"request body of {length} bytes exceeds the limit of {max_request_bytes}",
                                       HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
                raw = self.rfile.read(length)
                name, version, rest = self._route()
                if rest not in (":predict", ":classify"):
                    raise RequestError("POST is for :predict and :classify", HTTPStatus.METHOD_NOT_ALLOWED)
                try:
                    body = json.loads(raw or b"null")
                except (json.JSONDecodeError, UnicodeDecodeError) as error:
                    raise RequestError(f"JSON Parse error: {error}") from None
                if not isinstance(body, dict):
                    raise RequestError("the request body must be a JSON object")
                loaded = registry.get(name, version)
                signature = body.get("signature_name") or "serving_default"
                function = loaded.signature(signature)
                if rest == ":predict":
                    inputs, form = parse_predict_body(body, input_specs(function))
                    self._send(HTTPStatus.OK, format_predictions(registry.call(loaded, signature, inputs), form))
                else:
                    examples = body.get("examples")
                    if not isinstance(examples, list) or not examples:
                        raise RequestError("'examples' must be a non-empty list")
                    inputs, _ = parse_predict_body({"instances": examples}, input_specs(function))
                    outputs = registry.call(loaded, signature, inputs)
                    results = [[[cls, float(p)] for cls, p in zip(loaded.class_names, row)]
                               for row in outputs["probabilities"]]
                    self._send(HTTPStatus.OK, {"results": results})
            except RequestError as error:
                self._send(error.status, {"error": str(error)})
            except (tf.errors.InvalidArgumentError, ValueError, TypeError) as error:
                # TF rejects inputs it cannot use with many types
                self._send(HTTPStatus.BAD_REQUEST, {"error": str(error).splitlines()[0][:500]})
            except Exception as error:  # noqa: BLE001
                log.exception("serve: internal error")
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(error).__name__}"})

    return Handler


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default listen backlog of 5 resets bursts of concurrent clients


def make_server(run_dir: str, host: str = "127.0.0.1", port: int = 8501, *, max_batch_size: int = 32,
                batch_timeout_ms: float = 2.0, batching: bool = True, max_request_bytes: int = 10 * 2**20):
    """A ready ThreadingHTTPServer (call serve_forever); its `registry` has the models loaded."""
    registry = ModelRegistry(RunLayout(run_dir).exports, max_batch_size, batch_timeout_ms, batching)
    registry.scan()
    server = _Server((host, port), make_handler(registry, max_request_bytes))
    server.daemon_threads = True
    server.registry = registry
    return server
