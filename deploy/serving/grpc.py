"""TF Serving's gRPC API (PredictionService, ModelService) over the REST server's ModelRegistry.

The protos and stubs are tensorflow-serving-api's, so `PredictionServiceStub` and
`ModelServiceStub` clients connect unchanged. The registry, its batcher and its version
policy are shared with REST. Status codes as TF Serving's: INVALID_ARGUMENT for bad input,
NOT_FOUND for an unknown model or version, RESOURCE_EXHAUSTED for a message over the size
limit or more concurrent calls than `max_concurrent`.
"""

from __future__ import annotations

import logging
from concurrent import futures
from http import HTTPStatus

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import error_codes_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from deploy.serving.codec import (CLASSIFY, REGRESS, RequestError, check_classifier, class_labels, error_message,
                                  input_specs, takes_examples, to_tensor, UnknownSignature, wrong_method)
from deploy.serving.registry import ModelRegistry
from deploy.serving.routes import call_naming_the_instance
from deploy.serving.versions import LoadedVersion
from kcp.core.errors import UserError

log = logging.getLogger("kcp.serve")
CODES = {HTTPStatus.NOT_FOUND: grpc.StatusCode.NOT_FOUND, HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
         grpc.StatusCode.RESOURCE_EXHAUSTED, HTTPStatus.SERVICE_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
         HTTPStatus.NOT_IMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED}
STATES = {"AVAILABLE": get_model_status_pb2.ModelVersionStatus.AVAILABLE,
          "END": get_model_status_pb2.ModelVersionStatus.END}


_FIELDS = {np.dtype(np.float32): "float_val", np.dtype(np.float64): "double_val", np.dtype(np.int32): "int_val",
           np.dtype(np.int16): "int_val", np.dtype(np.int8): "int_val", np.dtype(np.uint8): "int_val",
           np.dtype(np.uint16): "int_val", np.dtype(np.int64): "int64_val", np.dtype(np.uint32): "uint32_val",
           np.dtype(np.uint64): "uint64_val", np.dtype(np.bool_): "bool_val"}


def output_proto(value) -> tf.compat.v1.TensorProto:
    """An output tensor as TF Serving's Predict answers it by default (predict_util.cc, kAsProtoField):
    the values in the typed fields (`float_val`, `int64_val`, `string_val`, ...), never in
    `tensor_content`, so that clients reading `outputs[name].float_val` get them."""
    array = np.asarray(value)
    proto = tf.make_tensor_proto(array)
    field = _FIELDS.get(array.dtype)
    if proto.tensor_content and field is not None:  # make_tensor_proto packs numeric tensors of 2+ values
        proto.tensor_content = b""
        getattr(proto, field).extend(array.ravel().tolist())
    elif proto.tensor_content and array.dtype.name in ("float16", "bfloat16"):  # their bits, as AsProtoField
        proto.tensor_content = b""
        proto.half_val.extend(array.ravel().view(np.uint16).tolist())
    return proto


def _dtype_name(dtype) -> str:
    """TensorFlow's C++ name of a dtype (DataTypeString), as TF Serving's messages give it."""
    if dtype is None:
        return "invalid"
    return {"float32": "float", "float64": "double", "float16": "half"}.get(dtype.name, dtype.name)


def _ndarray(name: str, proto):
    """A request's TensorProto as NumPy; a value its dtype cannot hold (uint8 int_val 300) is
    INVALID_ARGUMENT naming the input, not NumPy's OverflowError (UNKNOWN)."""
    try:
        return tf.make_ndarray(proto)
    except OverflowError:
        dtype = tf.dtypes.as_dtype(proto.dtype)
        raise RequestError(f"input {name!r}: {dtype.name} values must lie in {dtype.min}..{dtype.max}") from None
    except (ValueError, TypeError) as error:
        raise RequestError(f"input {name!r}: {error}") from None


def _answer(method):
    """Runs a servicer method, turning our errors into TF Serving's status codes."""
    def wrapped(self, request, context):
        try:
            return method(self, request, context)
        except RequestError as error:
            context.abort(CODES.get(error.status, grpc.StatusCode.INVALID_ARGUMENT), str(error))
        except RecursionError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request is nested too deep")
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, error_message(error))
    wrapped.__name__ = method.__name__
    return wrapped


def _lookup(registry: ModelRegistry, spec) -> LoadedVersion:
    if not spec.name:
        raise RequestError("Missing ModelSpec")
    version = str(spec.version.value) if spec.HasField("version") else None
    label = spec.version_label if spec.WhichOneof("version_choice") == "version_label" else None
    return registry.get(spec.name, version, label)


def _fill_spec(target, source, loaded: LoadedVersion, signature: str) -> None:
    target.name = source.name
    target.version.value = loaded.version
    target.signature_name = signature


def _examples(request_input) -> tf.Tensor:
    """The serialized tf.train.Examples of a tensorflow.serving.Input."""
    kind = request_input.WhichOneof("kind")
    if kind == "example_list":
        examples = [e.SerializeToString() for e in request_input.example_list.examples]
    elif kind == "example_list_with_context":
        context = request_input.example_list_with_context.context
        examples = []
        for example in request_input.example_list_with_context.examples:
            merged = type(example)()
            merged.CopyFrom(context)
            merged.MergeFrom(example)
            examples.append(merged.SerializeToString())
    else:
        raise RequestError("Input is empty")
    if not examples:
        raise RequestError("Input is empty")
    return tf.constant(examples, dtype=tf.string)


def _examples_signature(loaded: LoadedVersion, requested: str) -> str:
    """The signature that takes serialized Examples: the requested one, or serve_examples for the default."""
    for name in ([requested] if requested else []) + ([] if requested not in ("", "serving_default")
                                                       else ["serving_default", "serve_examples"]):
        function = loaded.model.signatures.get(name)
        if function is not None and takes_examples(function):
            return name
    loaded.signature(requested or "serving_default")  # 400 when it does not exist at all
    raise wrong_method(CLASSIFY)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, registry: ModelRegistry):
        self.registry = registry

    @_answer
    def Predict(self, request, context):  # noqa: N802
        loaded = _lookup(self.registry, request.model_spec)
        signature = request.model_spec.signature_name or "serving_default"
        try:
            specs = input_specs(loaded.signature(signature))
        except UnknownSignature:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{signature}" not found.')
        given = set(request.inputs)
        if given != set(specs):
            missing, extra = sorted(set(specs) - given), sorted(given - set(specs))
            raise RequestError(f"input tensor alias not found in signature: {extra[0]}. Inputs expected to be in "
                               f"the set {{{','.join(specs)}}}." if extra else
                               f"input size does not match signature: {len(given)}!={len(specs)} len({{{','.join(sorted(given))}"
                               f"}}) != len({{{','.join(specs)}}}). Missing: {','.join(missing)}")
        for index, name in enumerate(sorted(specs)):  # as TF Serving's session refuses a tensor of another dtype
            given_dtype = tf.dtypes.as_dtype(request.inputs[name].dtype) if request.inputs[name].dtype else None
            if given_dtype != specs[name].dtype:
                raise RequestError(f"Expects arg[{index}] to be {_dtype_name(specs[name].dtype)} but "
                                   f"{_dtype_name(given_dtype)} is provided")
        inputs = {n: to_tensor(n, _ndarray(n, request.inputs[n]), specs[n]) for n in specs}
        outputs = call_naming_the_instance(self.registry.call, loaded, signature, inputs)
        wanted = list(request.output_filter) or list(outputs)
        unknown = [n for n in wanted if n not in outputs]
        if unknown:
            raise RequestError(f"output tensor alias not found in signature: {unknown[0]}")
        response = predict_pb2.PredictResponse()
        _fill_spec(response.model_spec, request.model_spec, loaded, signature)
        for name in wanted:
            response.outputs[name].CopyFrom(output_proto(outputs[name]))
        return response

    def _classify(self, loaded, spec, request_input, result) -> str:
        signature = _examples_signature(loaded, spec.signature_name)
        check_classifier(loaded.signature(signature))
        outputs = call_naming_the_instance(self.registry.call, loaded, signature,
                                           {"examples": _examples(request_input)})
        for row in outputs["probabilities"]:
            classification = result.classifications.add()
            for label, score in zip(class_labels(loaded.class_names, len(row)), row):
                classification.classes.add(label=label, score=float(score))
        return signature

    @_answer
    def Classify(self, request, context):  # noqa: N802
        loaded = _lookup(self.registry, request.model_spec)
        response = classification_pb2.ClassificationResponse()
        signature = self._classify(loaded, request.model_spec, request.input, response.result)
        _fill_spec(response.model_spec, request.model_spec, loaded, signature)
        return response

    @_answer
    def Regress(self, request, context):  # noqa: N802
        loaded = _lookup(self.registry, request.model_spec)
        loaded.signature(request.model_spec.signature_name or "serving_default")
        raise wrong_method(REGRESS)

    @_answer
    def MultiInference(self, request, context):  # noqa: N802
        if not request.tasks:
            raise RequestError("Tasks is empty")
        names = {(t.model_spec.name, t.model_spec.version.value) for t in request.tasks}
        if len(names) != 1:
            raise RequestError("All ModelSpecs in a MultiInferenceRequest must access the same model name and version.")
        # as TF Serving's RunMultiInference: the first task's spec (version or label) picks the version for
        # all; a signature asked for twice, or a method other than classify and regress, is refused first
        loaded, seen = _lookup(self.registry, request.tasks[0].model_spec), set()
        for task in request.tasks:
            name = task.model_spec.signature_name or "serving_default"
            if name in seen:
                raise RequestError(f"Duplicate evaluation of signature: {name}")
            seen.add(name)
            if task.method_name not in (CLASSIFY, REGRESS):
                raise RequestError(f"Unsupported signature method_name: {task.method_name}", HTTPStatus.NOT_IMPLEMENTED)
        response = inference_pb2.MultiInferenceResponse()
        for task in request.tasks:
            if task.method_name == REGRESS:
                raise wrong_method(REGRESS)
            result = response.results.add()
            signature = self._classify(loaded, task.model_spec, request.input, result.classification_result)
            _fill_spec(result.model_spec, task.model_spec, loaded, signature)
        return response

    @_answer
    def GetModelMetadata(self, request, context):  # noqa: N802
        if not request.metadata_field:
            raise RequestError("GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field != "signature_def":
                raise RequestError(f"Metadata field {field} is not supported")
        loaded = _lookup(self.registry, request.model_spec)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        _fill_spec(response.model_spec, request.model_spec, loaded, "")
        response.metadata["signature_def"].Pack(loaded.signature_def_map)
        return response


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, registry: ModelRegistry):
        self.registry = registry

    @_answer
    def GetModelStatus(self, request, context):  # noqa: N802
        spec = request.model_spec
        if not spec.name:
            raise RequestError("Missing model name in request.")
        version = str(spec.version.value) if spec.HasField("version") else None
        label = spec.version_label if spec.WhichOneof("version_choice") == "version_label" else None
        response = get_model_status_pb2.GetModelStatusResponse()
        for entry in self.registry.status(spec.name, version, label):
            status = response.model_version_status.add(version=entry["version"], state=STATES[entry["state"]])
            status.status.error_code = error_codes_pb2.Code.Value(entry["error_code"])
            status.status.error_message = entry["error_message"]
        return response

    def HandleReloadConfigRequest(self, request, context):  # noqa: N802
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "kcp serve takes its models from --run-dir, not a config")


class GrpcServer:
    """A grpc.Server with TF Serving's two services; `port` is the bound one."""

    def __init__(self, registry: ModelRegistry, host: str, port: int, max_request_bytes: int, max_concurrent: int):
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=min(16, max_concurrent), thread_name_prefix="kcp-grpc"),
            maximum_concurrent_rpcs=max_concurrent,  # beyond it: RESOURCE_EXHAUSTED
            options=[("grpc.max_receive_message_length", max_request_bytes),
                     ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0)])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(registry), self.server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(registry), self.server)
        try:
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as error:
            raise UserError(f"--grpc-port {port}: cannot bind {host}:{port}: {error}") from None
        if not self.port:
            raise UserError(f"--grpc-port {port}: cannot bind {host}:{port} (in use?)")

    def start(self) -> None:
        self.server.start()

    def stop(self, grace: float | None = None, wait: bool = True) -> None:
        """No new calls; those in progress get `grace` seconds (None: cut at once). Without `wait`, returns at once."""
        stopped = self.server.stop(grace)
        if wait:
            stopped.wait()


def make_grpc_server(registry: ModelRegistry, host: str = "127.0.0.1", port: int = 8500, *,
                     max_request_bytes: int = 10 * 2**20, max_concurrent: int = 64) -> GrpcServer:
    return GrpcServer(registry, host, port, max_request_bytes, max_concurrent)
