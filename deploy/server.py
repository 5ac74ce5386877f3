"""A TensorFlow Serving-compatible REST server for the SavedModels under RUN/export/.

    kcp serve --run-dir runs/digits --port 8501

    GET  /v1/models/NAME[/versions/N]            version status
    GET  /v1/models/NAME[/versions/N]/metadata   signatures
    POST /v1/models/NAME[/versions/N]:predict    {"instances": [...]} or {"inputs": ...}
    POST /v1/models/NAME[/versions/N]:classify   {"examples": [...]}

Binary values are {"b64": "..."}. New version folders are picked up without a restart.
Concurrent requests to one signature are batched (`max_batch_size`, `batch_timeout_ms`).
Bad requests get 400 (or 404 for an unknown model or version, 413 for an oversized body)
with {"error": "..."}, as TF Serving answers; bad input never causes a 500. It binds
127.0.0.1 unless told otherwise. For production, the same SavedModels run unchanged in
TensorFlow Serving; this server is for local use, tests and small deployments.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

log = logging.getLogger("kcp.serve")
ROUTE = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+))?(?P<rest>/metadata|:predict|:classify)?$")


class RequestError(Exception):
    """A bad request: answered with `status` and {"error": message}."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


@dataclass
class LoadedVersion:
    version: int
    path: str
    model: object  # what tf.saved_model.load returned; keeps the signatures' variables alive
    class_names: list  # from the export's assets.extra/labels.txt
    batchers: dict = field(default_factory=dict)

    @property
    def signatures(self) -> dict:
        return dict(self.model.signatures)

    def signature(self, name: str):
        """The concrete function of signature `name`, or a 400 naming the ones there are."""
        function = self.model.signatures.get(name)
        if function is None:
            raise RequestError(f"signature {name!r} not found; this model has {', '.join(self.model.signatures)}")
        return function


def _decode_value(value):
    """JSON value -> Python value with {"b64": ...} turned into bytes (recursively)."""
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            try:
                return base64.b64decode(value["b64"], validate=True)
            except (ValueError, TypeError):
                raise RequestError("invalid base64 in a {\"b64\": ...} value") from None
        return {key: _decode_value(inner) for key, inner in value.items()}
    if isinstance(value, list):
        return [_decode_value(inner) for inner in value]
    return value


def _to_json(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return [_to_json(v) for v in value.tolist()] if value.dtype == object else value.tolist()
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def input_specs(function) -> dict:
    """{input name: tf.TensorSpec} of a signature's concrete function."""
    return dict(function.structured_input_signature[1])


def to_tensor(name: str, values, spec):
    """A request's values for one input as a tensor of the signature's dtype and shape."""
    import tensorflow as tf

    try:
        if spec.dtype == tf.string:
            array = np.array(values, dtype=object)
            if array.size and not all(isinstance(v, (bytes, str)) for v in array.ravel()):
                raise RequestError(f"input {name!r}: expected strings or {{\"b64\": ...}} values")
            tensor = tf.constant(array.tolist() if array.ndim else [array.item()], dtype=tf.string)
        else:
            array = np.asarray(values)
            if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
                raise RequestError(f"input {name!r}: expected numbers of dtype {spec.dtype.name}")
            if spec.dtype.is_integer and np.issubdtype(array.dtype, np.floating) and not np.all(array == np.round(array)):
                raise RequestError(f"input {name!r}: expected integers of dtype {spec.dtype.name}")
            if spec.dtype == tf.uint8 and array.size and (array.min() < 0 or array.max() > 255):
                raise RequestError(f"input {name!r}: uint8 values must lie in 0..255")
            tensor = tf.constant(array.astype(spec.dtype.as_numpy_dtype))
    except (ValueError, TypeError) as error:
        raise RequestError(f"input {name!r}: {error}") from None
    if not spec.shape.is_compatible_with(tensor.shape):
        raise RequestError(f"input {name!r}: shape {tensor.shape.as_list()} does not match the signature's "
                           f"{spec.shape.as_list()}")
    return tensor


class Batcher:
    """Collects concurrent calls of one signature into batches of at most `max_batch_size` rows."""

    def __init__(self, function, max_batch_size: int, timeout_s: float):
        self.function, self.max_batch_size, self.timeout_s = function, max_batch_size, timeout_s
        self.requests: queue.Queue = queue.Queue()
        self.batches_run = 0
        self.in_flight = 0  # calls that entered __call__ and have no result yet
        self.lock = threading.Lock()
        threading.Thread(target=self._loop, daemon=True).start()

    def __call__(self, inputs: dict) -> dict:
        future: Future = Future()
        with self.lock:
            self.in_flight += 1
        try:
            self.requests.put((inputs, future))
            return future.result()
        finally:
            with self.lock:
                self.in_flight -= 1

    def _loop(self):
        import tensorflow as tf

        while True:
            pending = [self.requests.get()]
            rows = len(next(iter(pending[0][0].values())))
            deadline = time.monotonic() + self.timeout_s
            # wait for more rows only while other calls are on their way: a lone request runs at once
            while rows < self.max_batch_size and self.in_flight > len(pending):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self.requests.get(timeout=remaining)
                except queue.Empty:
                    break
                pending.append(item)
                rows += len(next(iter(item[0].values())))
            sizes = [len(next(iter(inputs.values()))) for inputs, _ in pending]
            try:
                merged = {name: tf.concat([inputs[name] for inputs, _ in pending], axis=0) for name in pending[0][0]}
                outputs = {name: value.numpy() for name, value in self.function(**merged).items()}
                self.batches_run += 1
            except Exception:  # noqa: BLE001  one bad batch must not stop the batcher
                # fall back to one call each, so a bad request fails alone
                for inputs, future in pending:
                    try:
                        future.set_result({n: v.numpy() for n, v in self.function(**inputs).items()})
                    except Exception as single:  # noqa: BLE001
                        future.set_exception(single)
                continue
            start = 0
            for (inputs, future), size in zip(pending, sizes):
                future.set_result({name: value[start:start + size] for name, value in outputs.items()})
                start += size


class ModelRegistry:
    """The export folders of a run: RUN/export/NAME/VERSION, rescanned for new versions."""

    def __init__(self, export_root: str, max_batch_size: int = 32, batch_timeout_ms: float = 2.0,
                 batching: bool = True):
        self.export_root = export_root
        self.max_batch_size, self.timeout_s, self.batching = max_batch_size, batch_timeout_ms / 1000.0, batching
        self.models: dict[str, dict[int, LoadedVersion]] = {}
        self.lock = threading.Lock()

    def scan(self) -> None:
        """Loads versions that appeared since the last scan (complete folders only)."""
        import tensorflow as tf

        if not os.path.isdir(self.export_root):
            return
        for name in sorted(os.listdir(self.export_root)):
            directory = os.path.join(self.export_root, name)
            if not os.path.isdir(directory):
                continue
            for entry in sorted(os.listdir(directory)):
                path = os.path.join(directory, entry)
                if not entry.isdigit() or not os.path.exists(os.path.join(path, "saved_model.pb")):
                    continue  # temporary or half-copied folders are never loaded
                version = int(entry)
                with self.lock:
                    if version in self.models.get(name, {}):
                        continue
                try:
                    loaded = tf.saved_model.load(path)
                except Exception as error:  # noqa: BLE001  a broken export must not stop the server
                    log.error("serve: cannot load %s: %s", path, error)
                    continue
                labels = os.path.join(path, "assets.extra", "labels.txt")
                class_names = open(labels).read().splitlines() if os.path.exists(labels) else []
                with self.lock:
                    self.models.setdefault(name, {})[version] = LoadedVersion(version, path, loaded, class_names)
                log.info("serve: loaded %s version %d", name, version)

    def get(self, name: str, version: str | None) -> LoadedVersion:
        self.scan()
        with self.lock:
            versions = self.models.get(name)
            if not versions:
                raise RequestError(f"Servable not found for request: Latest({name})", HTTPStatus.NOT_FOUND)
            if version is None:
                return versions[max(versions)]
            if not version.isdigit() or int(version) not in versions:
                raise RequestError(f"Servable not found for request: Specific({name}, {version})", HTTPStatus.NOT_FOUND)
            return versions[int(version)]

    def call(self, loaded: LoadedVersion, signature: str, inputs: dict) -> dict:
        function = loaded.signature(signature)
        if not self.batching:
            return {name: value.numpy() for name, value in function(**inputs).items()}
        with self.lock:
            batcher = loaded.batchers.get(signature)
            if batcher is None:
                batcher = loaded.batchers[signature] = Batcher(function, self.max_batch_size, self.timeout_s)
        return batcher(inputs)


def parse_predict_body(body: dict, specs: dict) -> tuple[dict, str]:
    """TF Serving's row ("instances") or columnar ("inputs") format -> ({name: tensor}, format)."""
    if ("instances" in body) == ("inputs" in body):
        raise RequestError("the request must have exactly one of 'instances' (row format) or 'inputs' (columnar)")
    names = list(specs)
    if "instances" in body:
        instances = _decode_value(body["instances"])
        if not isinstance(instances, list) or not instances:
            raise RequestError("'instances' must be a non-empty list")
        if all(isinstance(i, dict) and not (set(i) == {"b64"}) for i in instances):
            missing = [n for n in names if any(n not in i for i in instances)]
            if missing:
                raise RequestError(f"instances lack input {missing[0]!r}; the signature takes {', '.join(names)}")
            columns = {n: [i[n] for i in instances] for n in names}
        elif len(names) == 1:
            columns = {names[0]: instances}
        else:
            raise RequestError(f"this signature takes several inputs ({', '.join(names)}): send objects per instance")
        return {n: to_tensor(n, v, specs[n]) for n, v in columns.items()}, "row"
    inputs = _decode_value(body["inputs"])
    if isinstance(inputs, dict):
        unknown = sorted(set(inputs) - set(names))
        if unknown:
            raise RequestError(f"unknown input {unknown[0]!r}; the signature takes {', '.join(names)}")
        missing = [n for n in names if n not in inputs]
        if missing:
            raise RequestError(f"'inputs' lacks {missing[0]!r}")
        return {n: to_tensor(n, inputs[n], specs[n]) for n in names}, "columnar"
    if len(names) != 1:
        raise RequestError(f"this signature takes several inputs ({', '.join(names)}): send an object")
    return {names[0]: to_tensor(names[0], inputs, specs[names[0]])}, "columnar"


def format_predictions(outputs: dict, form: str) -> dict:
    if form == "columnar":
        return {"outputs": {name: _to_json(value) for name, value in outputs.items()}}
    rows = len(next(iter(outputs.values())))
    return {"predictions": [{name: _to_json(value[i]) for name, value in outputs.items()} for i in range(rows)]}


DTYPE_NAMES = {"float32": "DT_FLOAT", "float64": "DT_DOUBLE"}


def tensor_info(spec) -> dict:
    """A TensorSpec as TF Serving's metadata writes a TensorInfo (unknown sizes are -1)."""
    return {"dtype": DTYPE_NAMES.get(spec.dtype.name, "DT_" + spec.dtype.name.upper()),
            "tensor_shape": {"dim": [{"size": str(-1 if size is None else size), "name": ""}
                                     for size in spec.shape.as_list()], "unknown_rank": False},
            "name": spec.name or ""}


def metadata(name: str, loaded: LoadedVersion) -> dict:
    signatures = {}
    for signature, function in loaded.signatures.items():
        signatures[signature] = {
            "inputs": {n: tensor_info(s) for n, s in input_specs(function).items()},
            "outputs": {n: tensor_info(s) for n, s in function.structured_outputs.items()},
            "method_name": "tensorflow/serving/predict",
        }
    return {"model_spec": {"name": name, "signature_name": "", "version": str(loaded.version)},
            "metadata": {"signature_def": {"signature_def": signatures}}}


def status(name: str, versions: list[int]) -> dict:
    return {"model_version_status": [{"version": str(v), "state": "AVAILABLE",
                                      "status": {"error_code": "OK", "error_message": ""}} for v in versions]}


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
                    self._send(HTTPStatus.OK, metadata(name, loaded))
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
            except Exception as error:  # noqa: BLE001  TF rejects inputs it cannot use with many types
                import tensorflow as tf

                if isinstance(error, (tf.errors.InvalidArgumentError, ValueError, TypeError)):
                    self._send(HTTPStatus.BAD_REQUEST, {"error": str(error).splitlines()[0][:500]})
                else:
                    log.exception("serve: internal error")
                    self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(error).__name__}"})

    return Handler


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default listen backlog of 5 resets bursts of concurrent clients


def make_server(run_dir: str, host: str = "127.0.0.1", port: int = 8501, *, max_batch_size: int = 32,
                batch_timeout_ms: float = 2.0, batching: bool = True, max_request_bytes: int = 10 * 2**20):
    """A ready ThreadingHTTPServer (call serve_forever); its `registry` has the models loaded."""
    registry = ModelRegistry(os.path.join(run_dir, "export"), max_batch_size, batch_timeout_ms, batching)
    registry.scan()
    server = _Server((host, port), make_handler(registry, max_request_bytes))
    server.daemon_threads = True
    server.registry = registry
    return server
