"""TF Serving's REST routes over a ModelRegistry, apart from HTTP: a request's method, path and
body in, (status, JSON body) out.

Routes and error answers follow tensorflow/serving's http_rest_api_handler.cc (its two path
patterns; anything else under /v1/ is 400 "Malformed request", outside /v1/ 404); JSON nested
deeper than MAX_JSON_DEPTH is 400. `route` is a generator that yields each model call it needs,
so the same steps run in a pool thread (`respond`) or on the event loop with the model call
awaited in the batcher (`respond_inline`); rest.py serves them over aiohttp.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from http import HTTPStatus
from urllib.parse import unquote

import numpy as np
import tensorflow as tf

from deploy.serving.codec import (REGRESS, RequestError, check_classifier, error_message, format_classifications,
                                  format_predictions, input_specs, metadata, parse_predict_body,
                                  signature_name, status, takes_examples, wrong_method)
from deploy.serving.json_examples import json_examples
from deploy.serving.registry import ModelRegistry, NotLoadedYet

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



# ---- the routes (run in the thread pool)

def route(registry: ModelRegistry, method: str, path: str, raw: bytes, *, wait: bool = True):
    """The answer to one request, or a RequestError carrying TF Serving's status and words.

    A generator: it yields each model call it needs, as (loaded version, signature, inputs),
    and is sent that call's outputs back, so that the same steps run in a pool thread
    (`respond`: the call made there) and on the event loop (`respond_inline`: the call queued
    in the batcher and awaited). Its return value is the answer. With `wait=False`, a version
    not loaded yet raises NotLoadedYet instead of waiting for a scan."""
    if not path.lower().startswith("/v1/"):
        raise RequestError(f"no such endpoint: {path}", HTTPStatus.NOT_FOUND)
    match = PREDICT.fullmatch(path) if method == "POST" else STATUS.fullmatch(path) if method == "GET" else None
    if match is None:
        raise RequestError(f"Malformed request: {method} {path}")
    # the name and the label percent-decoded, as TF Serving's DecodeArg does (curl_easy_unescape)
    name, version, label = (unquote(match.group("name") or "") or None, match.group("version"),
                            unquote(match.group("label")) if match.group("label") else None)
    if version is not None and int(version) > INT64_MAX:
        raise RequestError(f"Failed to convert version: {version} to numeric.")
    if method == "GET":
        if not name:
            raise RequestError("Missing model name in request.")
        if match.group("metadata"):
            loaded = registry.get(name, version, label, wait=wait)
            return metadata(name, loaded.version, loaded.signature_def_map)
        return status(registry.status(name, version, label))
    return (yield from _post(registry, name, version, label, match.group("method").lower(), raw, wait))


def _post(registry: ModelRegistry, name, version, label, method, raw, wait: bool):
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
    signature = signature_name(body)
    loaded = registry.get(name, version, label, wait=wait)
    function = loaded.signature(signature)
    if method == "predict":
        inputs, form = parse_predict_body(body, input_specs(function))
        return format_predictions((yield from _called(loaded, signature, inputs)), form)
    if method == "regress":  # TF Serving's answer for a signature that is not a regression one
        raise wrong_method(REGRESS)
    check_classifier(function)
    examples, context = body.get("examples"), body.get("context", {})
    if not isinstance(examples, list) or not examples:
        raise RequestError("'examples' must be a non-empty list")
    if not isinstance(context, dict):
        raise RequestError("'context' must be a JSON object of features")
    if takes_examples(function):  # serve_examples: tf.train.Examples by TF Serving's JSON rules, as gRPC Classify
        inputs = {"examples": tf.constant(json_examples(examples, context), tf.string)}
    else:  # the features name the signature's inputs (kcp's REST classify on serving_default)
        if context:
            if any(not isinstance(example, dict) for example in examples):
                raise RequestError("with a 'context', each of 'examples' must be a JSON object of features")
            examples = [{**context, **example} for example in examples]
        specs = input_specs(function)  # features the model does not take are ignored, as parse_example ignores
        examples = [{name: value for name, value in example.items() if name in specs} if isinstance(example, dict)
                    and set(example) != {"b64"} else example for example in examples]  # them (a label feature)
        inputs, _ = parse_predict_body({"instances": examples}, specs)
    return format_classifications((yield from _called(loaded, signature, inputs)), loaded.class_names)


def _called(loaded, signature: str, inputs: dict):
    """(yield from) the outputs of one call, which the caller makes and sends back (or throws its
    error in). When a call of several instances fails in an image decoder, each is called alone to
    name the first one that fails: TensorFlow's error names no instance ("Invalid JPEG data")."""
    try:
        return (yield loaded, signature, inputs)
    except tf.errors.InvalidArgumentError as error:
        shapes = [value.shape for value in inputs.values()]
        if not shapes or any(shape.rank == 0 for shape in shapes) or shapes[0][0] < 2 or \
                not error_message(error).startswith("could not decode the image"):
            raise
        rows = shapes[0][0]
        for index in range(rows):
            try:
                yield loaded, signature, {name: value[index:index + 1] for name, value in inputs.items()}
            except tf.errors.InvalidArgumentError as single:
                raise RequestError(f"instance {index}: {error_message(single)}") from None
        raise


def drive(steps, call):
    """Runs a generator of model calls (`route`, `_called`) to its value: each (loaded, signature,
    inputs) it yields is made with `call` and sent back, or its InvalidArgumentError thrown in
    (where `_called` may name the instance)."""
    try:
        request = next(steps)  # a route that makes no call (a model's status) stops here
        while True:
            try:
                outputs = call(*request)
            except tf.errors.InvalidArgumentError as error:
                request = steps.throw(error)
                continue
            request = steps.send(outputs)
    except StopIteration as done:
        return done.value


def call_naming_the_instance(call, loaded, signature: str, inputs: dict) -> dict:
    """`call(loaded, signature, inputs)`, with `_called`'s naming of an image that cannot be
    decoded (gRPC's Predict and Classify, which make their calls in one go)."""
    return drive(_called(loaded, signature, inputs), call)


def respond(registry: ModelRegistry, method: str, path: str, raw: bytes) -> tuple[int, bytes]:
    """(status, JSON body) for one request, its model calls made here (a pool thread); a bad
    request is a 4xx with {"error": ...}, never a 500."""
    try:
        value = drive(route(registry, method, path, raw), registry.call)
    except Exception as error:  # noqa: BLE001  sorted out by error_answer
        return error_answer(error)
    return ok_answer(value)


async def respond_inline(registry: ModelRegistry, pool, method: str, path: str, raw: bytes) -> tuple[int, bytes]:
    """`respond` on the event loop, for a small POST body: decoding and encoding run here, and
    the model call is queued in the batcher and awaited, so that no thread is handed the
    request. A call that cannot be batched runs in `pool`; a version not loaded yet sends the
    whole request to `pool`, where it may wait for the scan."""
    loop = asyncio.get_running_loop()
    try:
        steps = route(registry, method, path, raw, wait=False)
        call = next(steps)
        while True:
            future = registry.submit(*call)
            try:
                outputs = await (asyncio.wrap_future(future) if future is not None
                                 else loop.run_in_executor(pool, registry.call, *call))
            except tf.errors.InvalidArgumentError as error:  # the route may name the instance
                call = steps.throw(error)
                continue
            call = steps.send(outputs)
    except StopIteration as done:
        return ok_answer(done.value)
    except NotLoadedYet:
        return await loop.run_in_executor(pool, respond, registry, method, path, raw)
    except Exception as error:  # noqa: BLE001  sorted out by error_answer
        return error_answer(error)


def ok_answer(value) -> tuple[int, bytes]:
    """(200, JSON body); a float NaN or infinity no check caught is a 400, never a bare NaN (not JSON)."""
    try:
        return int(HTTPStatus.OK), json.dumps(value, allow_nan=False).encode("utf-8")
    except ValueError as error:
        return error_answer(error)


def error_answer(error: Exception) -> tuple[int, bytes]:
    """(status, JSON body) for an exception raised while answering a request."""
    if isinstance(error, RequestError):
        code, payload = error.status, {"error": str(error)}
    elif isinstance(error, (tf.errors.InvalidArgumentError, ValueError, TypeError)):
        # TF rejects inputs it cannot use with many types
        code, payload = HTTPStatus.BAD_REQUEST, {"error": error_message(error)}
    elif isinstance(error, RecursionError):
        code, payload = HTTPStatus.BAD_REQUEST, {"error": "JSON Parse error: nested too deep"}
    else:
        log.error("serve: internal error", exc_info=error)
        code, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(error).__name__}"}
    return int(code), json.dumps(payload).encode("utf-8")
