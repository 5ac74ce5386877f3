"""TF Serving's REST JSON: {"b64": ...} values, row and columnar requests, response bodies."""

from __future__ import annotations

import base64
import json
import re
from http import HTTPStatus

import numpy as np
import tensorflow as tf
from google.protobuf import json_format


class RequestError(Exception):
    """A bad request: answered with `status` and {"error": message}."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


class UnknownSignature(RequestError):
    """A signature the export does not have: 400 with TF Serving's REST words; gRPC Predict answers
    it FAILED_PRECONDITION, as TF Serving's predict_util.cc does."""

    def __init__(self, name: str):
        super().__init__(f'Serving signature name: "{name}" not found in signature def')
        self.name = name


CLASSIFY, REGRESS, PREDICT = "tensorflow/serving/classify", "tensorflow/serving/regress", "tensorflow/serving/predict"


def wrong_method(expected: str) -> RequestError:
    """TF Serving's answer to a classify or regress call on a signature of another kind (ours are all
    predict signatures)."""
    kind = "classification" if expected == CLASSIFY else "regression"
    return RequestError(f"Expected {kind} signature method_name to be {expected}. Was: {PREDICT}")


def check_classifier(function) -> None:
    """A signature classifies when it answers `probabilities` (and the labels name its columns);
    a 400 in TF Serving's words otherwise (a gpt's score or generate), before the model runs."""
    if "probabilities" not in function.structured_outputs:
        raise wrong_method(CLASSIFY)


def takes_examples(function) -> bool:
    """Whether a signature takes serialized tf.train.Examples: one string input named `examples`
    (serve_examples, the TFX convention)."""
    specs = input_specs(function)
    return list(specs) == ["examples"] and specs["examples"].dtype == tf.string


def class_labels(class_names, count: int) -> list:
    """The labels of `count` probability columns: the export's labels.txt, else the column numbers."""
    return list(class_names) if class_names else [str(i) for i in range(count)]


# lines of a TensorFlow error that are not its cause: the heading, where the node was defined, the node
_NOT_THE_CAUSE = re.compile(r'Graph execution error:$|Detected at node |File "|\[\[|<stack traces unavailable>$')


def error_message(error: Exception, limit: int = 500) -> str:
    """One line for a client: a graph assertion's own message (generate's "max_new_tokens must be
    at least 1"), else the cause line of TensorFlow's error (not its "Graph execution error:" or
    "Detected at node" headings), "could not decode the image (...)" when an image decoder failed."""
    text = str(error)
    assertion = re.search(r"assertion failed: \[([^\]]*)\]", text)
    if assertion:  # tf.debugging.assert_non_negative appends ".  " to the message
        return assertion.group(1).strip().removesuffix(".")[:limit]
    lines = [line.strip() for line in text.splitlines() if line.strip() and not _NOT_THE_CAUSE.match(line.strip())]
    cause = re.sub(r"\s*\[Op:[^\]]*\]$", "", lines[0]) if lines else type(error).__name__
    node = re.search(r"Detected at node (\S+)|\{\{node ([^}]+)\}\}", text)
    if node and "Decode" in (node.group(1) or node.group(2)):
        cause = f"could not decode the image ({cause})"
    return cause[:limit]


def _first_instance(bad: np.ndarray) -> str:
    """'instance I', the first row (instance) where the boolean mask `bad` holds True; 'its value'
    for a scalar."""
    return f"instance {int(np.argmax(bad.reshape(len(bad), -1).any(axis=1)))}" if bad.ndim else "its value"


def _not_finite(array: np.ndarray) -> np.ndarray | None:
    """The mask of NaN and infinities in a float array; None when there is none."""
    bad = ~np.isfinite(array) if array.dtype.kind == "f" else None
    return bad if bad is not None and bad.any() else None


def check_finite(name: str, array: np.ndarray, what: str) -> None:
    """RequestError naming the first instance (row) of `array` that holds NaN or an infinity:
    TF Serving's JSON would carry them as bare NaN, which is not JSON."""
    bad = _not_finite(array)
    if bad is not None:
        raise RequestError(f"{what} {name!r}: {_first_instance(bad)} holds NaN or infinite values")


def cast_finite(name: str, array: np.ndarray, dtype) -> np.ndarray:
    """`array` as `dtype`; a RequestError naming the instance when it holds NaN or an infinity, or a
    value that the cast would make infinite (1e39 as float32) or wrap (3000000000 as int32)."""
    check_finite(name, array, "input")
    target = np.dtype(dtype)

    def refuse_beyond(bad: np.ndarray, allowed: str):
        what = f"{_first_instance(bad)} holds a value" if array.ndim else f"{array.item()!r} is"
        raise RequestError(f"input {name!r}: {what} beyond {target.name}'s range ({allowed})")

    if target.kind in "iu" and array.size and array.dtype.kind in "iuf":
        info = np.iinfo(target)
        outside = (array < info.min) | (array > info.max)
        if outside.any():
            refuse_beyond(outside, f"{info.min}..{info.max}")
    with np.errstate(over="ignore"):
        cast = array.astype(dtype)
    bad = _not_finite(cast)  # finite before, infinite after: beyond a float type's range
    if bad is not None:
        refuse_beyond(bad, f"±{float(np.finfo(target).max):.7g}")
    return cast


def decode_value(value):
    """JSON value -> Python value with {"b64": ...} turned into bytes (recursively)."""
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            return _b64(value["b64"])
        return {key: decode_value(inner) for key, inner in value.items()}
    if isinstance(value, list):
        if value and not isinstance(value[0], (dict, list)) and not {dict, list} & set(map(type, value)):
            return value  # a list of numbers or strings, as images and sequences send (4x faster than one call each)
        return [decode_value(inner) for inner in value]
    return value


def _b64(text) -> bytes:
    """The bytes of a {"b64": ...} value as TF Serving's absl::Base64Unescape reads it: standard
    alphabet, whitespace and line breaks skipped (MIME encoders wrap at 76), padding optional."""
    if not isinstance(text, str):
        raise RequestError("invalid base64 in a {\"b64\": ...} value: not a string")
    compact = "".join(text.split())
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except ValueError:
        raise RequestError("invalid base64 in a {\"b64\": ...} value") from None


def _to_json(value, binary: bool = False):
    """A model output as JSON; with `binary` (an output whose name ends in _bytes, TF Serving's rule)
    each string is {"b64": ...}, else its UTF-8 text."""
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")} if binary else value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return [_to_json(v, binary) for v in value.tolist()] if value.dtype == object else value.tolist()
    if isinstance(value, list):
        return [_to_json(v, binary) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def input_specs(function) -> dict:
    """{input name: tf.TensorSpec} of a signature's concrete function."""
    return dict(function.structured_input_signature[1])


def holds_bool(values) -> bool:
    """Whether JSON-decoded `values` (nested lists) hold a true or false anywhere."""
    if type(values) is bool:
        return True
    if type(values) is not list or not values:
        return False
    if type(values[0]) is list:
        return any(holds_bool(value) for value in values)
    return bool in set(map(type, values))


def to_tensor(name: str, values, spec):
    """A request's values for one input as a tensor of the signature's dtype and shape."""
    try:
        if spec.dtype == tf.string:
            array = np.array(values, dtype=object)
            if array.size and not all(isinstance(v, (bytes, str)) for v in array.ravel()):
                raise RequestError(f"input {name!r}: expected strings or {{\"b64\": ...}} values")
            for index, value in enumerate(array.ravel()):  # a lone surrogate ("\ud800") is no UTF-8 text
                if isinstance(value, str) and not value.isascii():
                    try:
                        value.encode("utf-8")
                    except UnicodeEncodeError as error:
                        raise RequestError(f"input {name!r}: instance {index}: {ascii(value[error.start])} at character "
                                           f"{error.start} is not Unicode text (a lone surrogate)") from None
            tensor = tf.constant(array.tolist() if array.ndim else [array.item()], dtype=tf.string)
        else:
            array = np.asarray(values)
            if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
                raise RequestError(f"input {name!r}: expected numbers of dtype {spec.dtype.name}")
            if spec.dtype != tf.bool and (array.dtype == bool or holds_bool(values)):  # JSON true/false, also
                # mixed with numbers ([1, true] is an int array to NumPy): TF Serving refuses them for numbers
                raise RequestError(f"input {name!r}: expected numbers of dtype {spec.dtype.name}, got true/false")
            if spec.dtype.is_integer and np.issubdtype(array.dtype, np.floating) and not np.all(array == np.round(array)):
                raise RequestError(f"input {name!r}: expected integers of dtype {spec.dtype.name}")
            if spec.dtype == tf.uint8 and array.size and (array.min() < 0 or array.max() > 255):
                raise RequestError(f"input {name!r}: uint8 values must lie in 0..255")
            tensor = tf.constant(cast_finite(name, array, spec.dtype.as_numpy_dtype))
    except (ValueError, TypeError) as error:
        raise RequestError(f"input {name!r}: {ragged(values, spec) or error}") from None
    if not spec.shape.is_compatible_with(tensor.shape):
        # rows of one feature a step (an npz of [N, 60], which `kcp predict` takes): say how TF Serving wants them
        one_feature = spec.shape.rank == tensor.shape.rank + 1 and spec.shape[-1] == 1 and \
            spec.shape[:-1].is_compatible_with(tensor.shape)
        hint = "; each step goes in a list of its own, [[v1], [v2], …], one feature a step" if one_feature else ""
        raise RequestError(f"input {name!r}: shape {tensor.shape.as_list()} does not match the signature's "
                           f"{spec.shape.as_list()}{hint}")
    if spec.shape.rank and tensor.shape[0] == 0:  # the models fail on 0 rows in a graph op (BatchNorm)
        raise RequestError(f"input {name!r} must hold at least one instance (it is empty)")
    return tensor


def ragged(values, spec) -> str | None:
    """Which instance's shape differs from the first one's, for a batch numpy cannot make one array of."""
    if not isinstance(values, list) or not values:
        return None
    shapes = []
    for value in values:
        try:
            shapes.append(list(np.shape(value)))
        except ValueError:  # ragged inside the instance itself
            shapes.append("ragged")
    odd = next((index for index, shape in enumerate(shapes) if shape != shapes[0]), None)
    return None if odd is None else (f"instances of different shapes: instance 0 is {shapes[0]}, instance {odd} "
                                     f"{shapes[odd]}; the signature takes {spec.shape.as_list()[1:]} each")


def _row_column(name: str, values: list, spec):
    """One input's values across the instances: a list, or, for a scalar input of the signature
    (generate's max_new_tokens, temperature, ...), the one value every instance must repeat."""
    if spec.shape.rank != 0:
        return values
    if any(value != values[0] for value in values[1:]):
        raise RequestError(f"input {name!r} is a scalar of the signature: every instance must give the same value")
    return values[0]


def parse_predict_body(body: dict, specs: dict) -> tuple[dict, str]:
    """TF Serving's row ("instances") or columnar ("inputs") format -> ({name: tensor}, format).
    A scalar input in the row format is given in every instance, with one value."""
    if ("instances" in body) == ("inputs" in body):
        raise RequestError("the request must have exactly one of 'instances' (row format) or 'inputs' (columnar)")
    names = list(specs)
    if "instances" in body:
        instances = decode_value(body["instances"])
        if not isinstance(instances, list) or not instances:
            raise RequestError("'instances' must be a non-empty list")
        if all(isinstance(i, dict) and not (set(i) == {"b64"}) for i in instances):
            unknown = next(((row, key) for row, i in enumerate(instances) for key in i if key not in specs), None)
            if unknown:  # TF Serving: "Failed to process element: 0 key: X of 'instances' list ... does not have
                raise RequestError(f"instance {unknown[0]}: unknown input {unknown[1]!r}; the signature takes "
                                   f"{', '.join(names)}")  # named input: X"; a misspelled input is not ignored
            missing = [n for n in names if any(n not in i for i in instances)]
            if missing:
                raise RequestError(f"instances lack input {missing[0]!r}; the signature takes {', '.join(names)}")
            columns = {n: _row_column(n, [i[n] for i in instances], specs[n]) for n in names}
        elif len(names) == 1:
            columns = {names[0]: instances}
        else:
            raise RequestError(f"this signature takes several inputs ({', '.join(names)}): send objects per instance")
        return {n: to_tensor(n, v, specs[n]) for n, v in columns.items()}, "row"
    inputs = decode_value(body["inputs"])
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
    """A REST answer, outputs in name order: the same request gets the same bytes back (a
    SavedModel's output dict comes back in no fixed order)."""
    outputs = dict(sorted(outputs.items()))
    for name, value in outputs.items():
        check_finite(name, np.asarray(value), "output")
    binary = {name: name.endswith("_bytes") for name in outputs}
    if form == "columnar":  # one output: its value alone, as TF Serving (json_tensor.cc) answers
        columns = {name: _to_json(value, binary[name]) for name, value in outputs.items()}
        return {"outputs": next(iter(columns.values())) if len(columns) == 1 else columns}
    rows = len(next(iter(outputs.values())))
    if len(outputs) == 1:
        (name, value), = outputs.items()
        return {"predictions": [_to_json(value[i], binary[name]) for i in range(rows)]}
    return {"predictions": [{name: _to_json(value[i], binary[name]) for name, value in outputs.items()}
                            for i in range(rows)]}


def signature_name(body: dict) -> str:
    """A REST request's `signature_name` (default: serving_default); a 400 naming it when it is not a string."""
    name = body.get("signature_name", "")
    if not isinstance(name, str):
        raise RequestError(f"'signature_name' key must be a string value, not {json.dumps(name)[:100]}")
    return name or "serving_default"


def format_classifications(outputs: dict, class_names) -> dict:
    """A :classify answer: [[class, score], ...] per example."""
    probabilities = np.asarray(outputs["probabilities"])
    check_finite("probabilities", probabilities, "output")
    labels = class_labels(class_names, probabilities.shape[-1])
    return {"results": [[[name, float(p)] for name, p in zip(labels, row)] for row in probabilities]}


def metadata(name: str, version: int, signature_def_map) -> dict:
    """TF Serving's GetModelMetadata answer as JSON: the export's SignatureDefMap, printed as TF Serving
    prints protos (field names as in the .proto, int64 as strings, empty fields included)."""
    try:
        printed = json_format.MessageToDict(signature_def_map, preserving_proto_field_name=True,
                                            always_print_fields_with_no_presence=True)
    except TypeError:  # protobuf before 5.26 names the option as it was
        printed = json_format.MessageToDict(signature_def_map, preserving_proto_field_name=True,
                                            including_default_value_fields=True)
    return {"model_spec": {"name": name, "signature_name": "", "version": str(version)},
            "metadata": {"signature_def": printed}}


def status(entries: list[dict]) -> dict:
    """TF Serving's GetModelStatus answer as JSON, from ModelRegistry.status entries."""
    return {"model_version_status": [{"version": str(e["version"]), "state": e["state"],
                                      "status": {"error_code": e["error_code"], "error_message": e["error_message"]}}
                                     for e in entries]}
