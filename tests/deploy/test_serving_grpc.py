"""TF Serving's gRPC API with the official tensorflow-serving-api stubs: the same predictions as
REST and as the in-process call, Classify/MultiInference over serve_examples, TF Serving's
status codes, and the size limit (RESOURCE_EXHAUSTED)."""

import base64
import json
import os
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from deploy.serving import make_server
from kcp.core import contract as contract_lib
from tests.deploy.test_serving_hostile import digit_png

LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def grpc_server(digits_run):
    httpd = make_server(digits_run, "127.0.0.1", 0, grpc_port=0, max_request_bytes=LIMIT, allow_unvalidated=True)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{httpd.grpc.port}",
                                    options=[("grpc.max_send_message_length", 4 * LIMIT)])
    yield (prediction_service_pb2_grpc.PredictionServiceStub(channel),
           model_service_pb2_grpc.ModelServiceStub(channel), f"http://127.0.0.1:{httpd.server_address[1]}")
    channel.close()
    httpd.shutdown()
    httpd.server_close()


def predict_request(images: list[bytes], name: str = "model", **spec) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, key, value)
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(images, dtype=tf.string))
    return request


def test_predict_equals_rest_and_the_in_process_call(grpc_server, digits_run):
    predictions, _, url = grpc_server
    png = digit_png()
    response = predictions.Predict(predict_request([png, png]), timeout=30)
    assert response.model_spec.name == "model" and response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    probabilities = tf.make_ndarray(response.outputs["probabilities"])
    body = json.dumps({"instances": [{"b64": base64.b64encode(png).decode()}]}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/models/model:predict", data=body)) as answer:
        rest = json.loads(answer.read())["predictions"][0]
    loaded = tf.saved_model.load(os.path.join(digits_run, "export", "model", "1"))
    local = loaded.signatures["serving_default"](image_bytes=tf.constant([png]))
    np.testing.assert_allclose(probabilities[0], rest["probabilities"], atol=1e-6)
    np.testing.assert_allclose(probabilities[0], local["probabilities"][0], atol=1e-6)
    assert tf.make_ndarray(response.outputs["class_ids"])[0] == rest["class_ids"] == int(local["class_ids"][0])
    assert tf.make_ndarray(response.outputs["class_names"])[0].decode() == rest["class_names"]
    # the values in the typed fields, as TF Serving answers by default: clients read float_val
    # (tensorflow/serving's mnist_client.py), not tensor_content
    assert not response.outputs["probabilities"].tensor_content
    np.testing.assert_array_equal(np.reshape(response.outputs["probabilities"].float_val, (2, -1)), probabilities)
    assert list(response.outputs["class_ids"].int64_val) == [rest["class_ids"]] * 2
    filtered = predict_request([png], version=1)
    filtered.output_filter.append("class_ids")
    assert list(predictions.Predict(filtered, timeout=30).outputs) == ["class_ids"]


def test_classify_and_multi_inference_over_examples(grpc_server, digits_run):
    predictions, _, _ = grpc_server
    contract = contract_lib.read_contract(digits_run)
    files = contract.split_files(contract_lib.data_dir(digits_run), "test")
    serialized = [record.numpy() for record in tf.data.TFRecordDataset(files).take(3)]
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "model"
    for record in serialized:
        request.input.example_list.examples.add().ParseFromString(record)
    response = predictions.Classify(request, timeout=30)
    loaded = tf.saved_model.load(os.path.join(digits_run, "export", "model", "1"))
    expected = loaded.signatures["serve_examples"](examples=tf.constant(serialized))["probabilities"].numpy()
    assert response.model_spec.signature_name == "serve_examples"
    for classification, row in zip(response.result.classifications, expected):
        assert [c.label for c in classification.classes] == [str(i) for i in range(10)]
        np.testing.assert_allclose([c.score for c in classification.classes], row, atol=1e-6)
    multi = inference_pb2.MultiInferenceRequest()
    multi.tasks.add(method_name="tensorflow/serving/classify").model_spec.name = "model"
    multi.input.CopyFrom(request.input)
    result = predictions.MultiInference(multi, timeout=30).results[0]
    assert result.classification_result == response.result
    # refused as TF Serving's RunMultiInference refuses them, before any task runs
    for method, signature, code, text in (
            ("tensorflow/serving/classify", "", "INVALID_ARGUMENT", "Duplicate evaluation of signature: serving_default"),
            ("tensorflow/serving/predict", "serve_images", "UNIMPLEMENTED", "Unsupported signature method_name"),
            ("tensorflow/serving/regress", "serve_examples", "INVALID_ARGUMENT", "")):
        del multi.tasks[1:]
        task = multi.tasks.add(method_name=method)
        task.model_spec.name, task.model_spec.signature_name = "model", signature
        with pytest.raises(grpc.RpcError) as error:
            predictions.MultiInference(multi, timeout=30)
        assert error.value.code() == getattr(grpc.StatusCode, code) and text in error.value.details()


def as_json_features(example: tf.train.Example) -> dict:
    """A tf.train.Example's features as a REST :classify example (TF Serving's JSON rules backwards)."""
    features = {}
    for name, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        values = list(getattr(feature, kind).value)
        features[name] = [{"b64": base64.b64encode(v).decode()} for v in values] if kind == "bytes_list" else values
    return features


def test_rest_classify_through_serve_examples_equals_grpc_classify(grpc_server, digits_run):
    """The same examples over REST (JSON features, signature_name serve_examples) and gRPC get the
    same classes and scores; the context's features go into every example, and an example's own win."""
    predictions, _, url = grpc_server
    contract = contract_lib.read_contract(digits_run)
    files = contract.split_files(contract_lib.data_dir(digits_run), "test")
    first, second = (tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(files).take(2))
    loaded = tf.saved_model.load(os.path.join(digits_run, "export", "model", "1"))
    expected = loaded.signatures["serve_examples"](examples=tf.constant(
        [first.SerializeToString(), second.SerializeToString()]))["probabilities"].numpy()
    assert np.abs(expected[0] - expected[1]).max() > 1e-3  # two different answers, so a mix-up shows
    body = {"signature_name": "serve_examples", "context": as_json_features(first),
            "examples": [{}, {contract.input_feature: as_json_features(second)[contract.input_feature]}]}
    request = urllib.request.Request(f"{url}/v1/models/model:classify", data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=60) as answer:
        rest = json.loads(answer.read())["results"]
    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name, classify.model_spec.signature_name = "model", "serve_examples"
    classify.input.example_list_with_context.context.CopyFrom(first)
    classify.input.example_list_with_context.examples.add()
    classify.input.example_list_with_context.examples.add().features.feature[contract.input_feature].CopyFrom(
        second.features.feature[contract.input_feature])
    over_grpc = predictions.Classify(classify, timeout=30).result.classifications
    for row, classes, probabilities in zip(rest, over_grpc, expected):
        assert [label for label, _ in row] == [c.label for c in classes.classes] == [str(i) for i in range(10)]
        np.testing.assert_allclose([score for _, score in row], probabilities, atol=1e-6)
        np.testing.assert_allclose([c.score for c in classes.classes], probabilities, atol=1e-6)


def test_metadata_and_status(grpc_server):
    predictions, models, url = grpc_server
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "model"
    response = predictions.GetModelMetadata(request, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    # every SignatureDef saved, TensorFlow's own init op included, as TF Serving lists them
    assert set(signatures.signature_def) == {"serving_default", "serve_images", "serve_examples",
                                             "__saved_model_init_op"}
    assert signatures.signature_def["serving_default"].inputs["image_bytes"].dtype == tf.string.as_datatype_enum
    with urllib.request.urlopen(f"{url}/v1/models/model/metadata", timeout=30) as answer:
        rest = json.load(answer)["metadata"]["signature_def"]
    assert rest == json_format.MessageToDict(signatures, preserving_proto_field_name=True,
                                             always_print_fields_with_no_presence=True)
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "model"
    [status] = models.GetModelStatus(status_request, timeout=30).model_version_status
    assert status.version == 1 and status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert status.status.error_code == 0


def typed_request(signature: str, array) -> predict_pb2.PredictRequest:
    """A Predict request of one input, named as `signature` names it, holding `array` in its own dtype."""
    request = predict_pb2.PredictRequest(model_spec={"name": "model", "signature_name": signature})
    request.inputs["image_bytes" if signature == "serving_default" else "image"].CopyFrom(tf.make_tensor_proto(array))
    return request


def uint8_request(values: list[int]) -> predict_pb2.PredictRequest:
    """serve_images' uint8 tensor with int_val values a client may send, whatever they are."""
    request = typed_request("serve_images", np.zeros([1, 8, 8, 1], "uint8"))
    request.inputs["image"].ClearField("tensor_content")
    request.inputs["image"].int_val.extend(values + [0] * (64 - len(values)))
    return request


def regress_request():
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = "model"
    request.input.example_list.examples.add()
    return request


def status_request(name):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    return request


@pytest.mark.parametrize("call, make, code, text", [
    ("Predict", lambda: predict_request([digit_png()], name="nope"), "NOT_FOUND", "Servable not found"),
    ("Predict", lambda: predict_request([digit_png()], version=9), "NOT_FOUND", "Specific(model, 9)"),
    ("Predict", lambda: predict_request([digit_png()], version_label="stable"), "INVALID_ARGUMENT",
     "Unrecognized servable version label"),
    ("Predict", lambda: predict_request([b"not an image"]), "INVALID_ARGUMENT", ""),
    ("Predict", lambda: predict_request([]), "INVALID_ARGUMENT", "input 'image_bytes' must hold at least one instance"),
    ("Predict", lambda: predict_request([digit_png(), b"\x89PNG\r\n\x1a\n" + bytes(40)]), "INVALID_ARGUMENT",
     "instance 1: could not decode the image (Invalid PNG"),  # a damaged file named by its instance, as over REST
    ("Predict", lambda: predict_request([digit_png()], signature_name="nope"), "FAILED_PRECONDITION",
     'Serving signature key "nope" not found.'),
    ("Predict", lambda: predict_pb2.PredictRequest(model_spec={"name": "model"}), "INVALID_ARGUMENT",
     "input size does not match"),
    ("Predict", lambda: predict_request([b"x" * (2 * LIMIT)]), "RESOURCE_EXHAUSTED", ""),
    ("Predict", lambda: typed_request("serving_default", np.ones([1], "float32")), "INVALID_ARGUMENT",
     "Expects arg[0] to be string but float is provided"),
    ("Predict", lambda: typed_request("serve_images", np.ones([1, 8, 8, 1], "float64")), "INVALID_ARGUMENT",
     "Expects arg[0] to be uint8 but double is provided"),
    ("Predict", lambda: uint8_request([300, -1]), "INVALID_ARGUMENT",  # was UNKNOWN: NumPy's OverflowError
     "input 'image': uint8 values must lie in 0..255"),
    ("Regress", regress_request, "INVALID_ARGUMENT", "Expected regression signature"),
    ("GetModelStatus", lambda: status_request("nope"), "NOT_FOUND", "Could not find any versions of model nope"),
    ("GetModelMetadata", lambda: get_model_metadata_pb2.GetModelMetadataRequest(model_spec={"name": "model"}),
     "INVALID_ARGUMENT", "at least one metadata_field"),
])
def test_tf_serving_status_codes(grpc_server, call, make, code, text):
    predictions, models, _ = grpc_server
    stub = models if call == "GetModelStatus" else predictions
    with pytest.raises(grpc.RpcError) as error:
        getattr(stub, call)(make(), timeout=30)
    assert error.value.code() == getattr(grpc.StatusCode, code) and text in error.value.details()
    assert predictions.Predict(predict_request([digit_png()]), timeout=30).outputs  # still serving


def test_calls_beyond_the_concurrency_limit_are_resource_exhausted(digits_run):
    httpd = make_server(digits_run, "127.0.0.1", 0, grpc_port=0, max_connections=1, allow_unvalidated=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{httpd.grpc.port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            request = predict_request([digit_png()] * 8)
            barrier = threading.Barrier(16)

            def client(_):
                barrier.wait()
                codes = []
                for _ in range(3):
                    try:
                        stub.Predict(request, timeout=30)
                        codes.append(grpc.StatusCode.OK)
                    except grpc.RpcError as error:
                        codes.append(error.code())
                return codes

            with ThreadPoolExecutor(16) as pool:
                codes = {code for codes in pool.map(client, range(16)) for code in codes}
        assert codes == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    finally:
        httpd.server_close()


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64, tf.int32, tf.int64, tf.uint8, tf.bool, tf.float16,
                                   tf.bfloat16, tf.string])
def test_outputs_are_answered_in_the_typed_fields_and_read_back_exactly(dtype):
    """TF Serving's default (kAsProtoField): values in float_val, int64_val, half_val (float16 and
    bfloat16 bits), ..., never in tensor_content; tf.make_ndarray reads them back as they were."""
    from deploy.serving.grpc import output_proto

    values = tf.constant([["a", "bc"], ["", "d"]]) if dtype == tf.string else tf.cast([[1, 0], [3, 2]], dtype)
    proto = output_proto(values.numpy())
    assert not proto.tensor_content and proto.dtype == dtype.as_datatype_enum
    np.testing.assert_array_equal(tf.make_ndarray(proto), values.numpy())
