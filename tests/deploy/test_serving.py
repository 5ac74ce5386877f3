"""Validate, push, the TF-Serving-compatible REST server over loopback, and batch prediction."""

import base64
import gzip
import io
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from deploy.serving import make_server, rest
from deploy.serving.codec import format_predictions
from deploy.serving.routes import respond
from kcp import cli
from tests.conftest import IN_PROCESS_BEAM
from tests.trainer.test_language_model import language_run  # noqa: F401  the session's gpt run


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A colour image folder (3 classes, 10x12 and some 20x24 files) run through run, validate."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index in range(90):
        label = index % 3
        image = np.zeros((10, 12, 3), np.uint8)
        image[..., label] = 200  # the class is the dominant channel: learnable in a few epochs
        image = np.clip(image + rng.integers(0, 40, image.shape), 0, 255).astype(np.uint8)
        if index % 10 == 0:
            image = np.asarray(Image.fromarray(image).resize((24, 20)))
        path = root / f"class{label}" / f"{index:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    run_dir = str(tmp_path_factory.mktemp("image_run"))
    assert cli.main(["run", "--source", f"folder:{root}", "--run-dir", run_dir, "--set", "train.epochs=8",
                     "--set", "model.filters=[8]", "--set", "export.name=colors", "--", *IN_PROCESS_BEAM]) == 0
    return run_dir, root


@pytest.fixture()
def server(image_run):
    run_dir, _ = image_run
    httpd = make_server(run_dir, "127.0.0.1", 0, max_batch_size=16, batch_timeout_ms=20, allow_unvalidated=True,
                        poll_seconds=0.1)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    httpd.shutdown()
    httpd.server_close()


def call(url, body=None, raw=None, headers=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_for(condition, seconds: float = 20.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def png_b64(path) -> str:
    return base64.b64encode(open(path, "rb").read()).decode()


def test_export_has_signatures_labels_and_warmup(image_run):
    from tensorflow_serving.apis import prediction_log_pb2

    run_dir, _ = image_run
    version = os.path.join(run_dir, "export", "colors", "1")
    loaded = tf.saved_model.load(version)
    assert set(loaded.signatures) == {"serving_default", "serve_images", "serve_examples"}
    assert open(os.path.join(version, "assets.extra", "labels.txt")).read().split() == ["class0", "class1", "class2"]
    records = list(tf.data.TFRecordDataset(os.path.join(version, "assets.extra", "tf_serving_warmup_requests")))
    assert 0 < len(records) <= 1000
    log = prediction_log_pb2.PredictionLog.FromString(records[0].numpy())
    request = log.predict_log.request
    assert request.model_spec.signature_name == "serving_default" and "image_bytes" in request.inputs
    replay = loaded.signatures["serving_default"](image_bytes=tf.make_ndarray(request.inputs["image_bytes"]))
    assert replay["probabilities"].shape[1] == 3


def test_the_three_signatures_agree(image_run):
    from kcp.core import contract as contract_lib
    from kcp.core import examples as example_lib

    run_dir, _ = image_run
    contract = contract_lib.read_contract(run_dir)
    loaded = tf.saved_model.load(os.path.join(run_dir, "export", "colors", "1"))
    serialized = next(iter(tf.data.TFRecordDataset(contract.split_files(contract_lib.data_dir(run_dir), "test"))
                           .batch(8)))
    images, _, _ = example_lib.parse_examples(contract, serialized)
    by_examples = loaded.signatures["serve_examples"](examples=serialized)["probabilities"].numpy()
    by_arrays = loaded.signatures["serve_images"](image=images)["probabilities"].numpy()
    png = tf.stack([tf.io.encode_png(image) for image in images])
    by_bytes = loaded.signatures["serving_default"](image_bytes=png)["probabilities"].numpy()
    np.testing.assert_allclose(by_examples, by_arrays, atol=1e-6)
    np.testing.assert_allclose(by_bytes, by_arrays, atol=1e-6)


def test_validation_blesses_a_faithful_export(image_run):
    run_dir, _ = image_run
    assert cli.main(["validate", "--run-dir", run_dir]) == 0
    result = json.load(open(os.path.join(run_dir, "export", "colors", "1", "assets.extra", "validation.json")))
    assert result["blessed"] is True and abs(result["difference"]) <= 0.005
    assert result["export_accuracy"] == pytest.approx(result["trainer_accuracy"], abs=0.005)


def test_validation_refuses_below_min_accuracy(digits_run, tmp_path, capsys):
    """A blessed version validated again with a floor it does not meet loses its blessing, and the
    line says what a server of the run falls back to (a server dropped it without a word)."""
    copy = str(tmp_path / "copy")
    shutil.copytree(digits_run, copy)  # 3 epochs of digits: well below 0.999
    shutil.copytree(os.path.join(copy, "export", "model", "1"), os.path.join(copy, "export", "model", "2"))
    capsys.readouterr()
    assert cli.main(["validate", "--run-dir", copy, "--set", "export.min_accuracy=0.999"]) == 1
    result = json.load(open(os.path.join(copy, "export", "model", "2", "assets.extra", "validation.json")))
    assert result["blessed"] is False and "below export.min_accuracy 0.999" in result["reasons"][0]
    assert "lost_blessing" not in result  # in what the API returns, not in the record
    assert ("[validate] version 2 was blessed before and is not now: kcp serve and kcp predict use version 1\n"
            in capsys.readouterr().out)
    accuracy = json.load(open(os.path.join(copy, "export", "model", "1", "assets.extra", "validation.json")))[
        "export_accuracy"]
    os.makedirs(os.path.join(copy, "export", "model", "3"))  # an export under way: no saved_model.pb, no version
    assert cli.main(["versions", "--run-dir", copy]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"model version 2: NOT blessed, test accuracy {result['export_accuracy']:.4f}: {result['reasons'][0]}",
        f"model version 1: blessed, test accuracy {accuracy:.4f} <- kcp serve"]
    assert cli.main(["validate", "--run-dir", copy, "--version", "1", "--set", "export.min_accuracy=0.999"]) == 1
    assert ("[validate] version 1 was blessed before and is not now: kcp serve and kcp predict have no blessed "
            "version of this model to use") in capsys.readouterr().out
    assert cli.main(["validate", "--run-dir", copy, "--version", "1", "--set", "export.min_accuracy=0.999"]) == 1
    assert "was blessed before" not in capsys.readouterr().out  # not blessed before this one


def test_push_to_the_emulator_and_refuse_unblessed(image_run, gcs, tmp_path, capsys):
    from deploy.push import push_export

    run_dir, _ = image_run
    copy = str(tmp_path / "copy")
    shutil.copytree(run_dir, copy)
    assert cli.main(["validate", "--run-dir", copy]) == 0
    capsys.readouterr()
    assert cli.main(["push", "--run-dir", copy, "--to", "gs://kcp-test/models/colors"]) == 0
    names = sorted(blob.name for blob in gcs.list_blobs("kcp-test", prefix="models/colors/1/"))
    assert f"[push] {copy}/export/colors/1: {len(names)} files -> gs://kcp-test/models/colors/1/\n" \
        in capsys.readouterr().out  # which version went where
    assert "models/colors/1/saved_model.pb" in names and "models/colors/1/assets.extra/validation.json" in names
    local = sorted(os.path.relpath(os.path.join(d, f), os.path.join(copy, "export", "colors", "1"))
                   for d, _, files in os.walk(os.path.join(copy, "export", "colors", "1")) for f in files)
    assert [name[len("models/colors/1/"):] for name in names] == local
    assert cli.main(["push", "--run-dir", copy, "--to", "gs://kcp-test/models/colors"]) == 2  # never overwritten
    assert "already exists" in capsys.readouterr().err

    validation = os.path.join(copy, "export", "colors", "1", "assets.extra", "validation.json")
    result = json.load(open(validation))
    result.update(blessed=False, reasons=["export accuracy 0.5 is below export.min_accuracy 0.9"])
    json.dump(result, open(validation, "w"))
    with pytest.raises(Exception, match=r"not blessed \(export accuracy 0.5 is below export.min_accuracy 0.9\); "
                                        r"push with --force to push it anyway$"):
        push_export(os.path.join(copy, "export", "colors", "1"), "gs://kcp-test/models/other")
    shutil.copytree(os.path.join(copy, "export", "colors", "1"), os.path.join(copy, "export", "colors", "2"))
    result.update(blessed=True, reasons=[])
    json.dump(result, open(validation, "w"))  # version 1 blessed, version 2 (its copy) not
    with pytest.raises(Exception, match=r"2: not blessed \(export accuracy 0.5 is below export.min_accuracy 0.9\); "
                                        r"push --version 1, the newest blessed one, or push with --force"):
        push_export(os.path.join(copy, "export", "colors", "2"), "gs://kcp-test/models/other")
    assert push_export(os.path.join(copy, "export", "colors", "2"), "gs://kcp-test/models/other", force=True)


def test_status_and_metadata(server):
    url, _ = server
    code, body = call(f"{url}/v1/models/colors")
    assert code == 200 and body["model_version_status"][0] == {
        "version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    code, body = call(f"{url}/v1/models/colors/metadata")
    signatures = body["metadata"]["signature_def"]["signature_def"]
    assert code == 200 and signatures["serving_default"]["inputs"]["image_bytes"]["dtype"] == "DT_STRING"
    assert signatures["serving_default"]["inputs"]["image_bytes"]["name"] == "serving_default_image_bytes:0"
    assert signatures["serving_default"]["method_name"] == "tensorflow/serving/predict"
    image = signatures["serve_images"]["inputs"]["image"]
    assert image["dtype"] == "DT_UINT8"
    assert [d["size"] for d in image["tensor_shape"]["dim"]] == ["-1", "10", "12", "3"]
    assert signatures["serving_default"]["outputs"]["probabilities"]["dtype"] == "DT_FLOAT"


def test_row_and_columnar_formats_and_another_size(server, image_run):
    url, _ = server
    run_dir, root = image_run
    big = root / "class1" / "010.png"  # saved at 24x20, the model takes 12x10
    assert Image.open(big).size == (24, 20)
    loaded = tf.saved_model.load(os.path.join(run_dir, "export", "colors", "1"))
    expected = loaded.signatures["serving_default"](image_bytes=tf.constant([open(big, "rb").read()]))
    code, rows = call(f"{url}/v1/models/colors:predict", {"instances": [{"b64": png_b64(big)}]})
    assert code == 200
    assert rows["predictions"][0]["class_ids"] == int(expected["class_ids"][0])
    assert rows["predictions"][0]["class_names"] == expected["class_names"][0].numpy().decode()
    np.testing.assert_allclose(rows["predictions"][0]["probabilities"], expected["probabilities"][0], atol=1e-6)
    code, columns = call(f"{url}/v1/models/colors/versions/1:predict",
                         {"inputs": {"image_bytes": [{"b64": png_b64(big)}, {"b64": png_b64(root / "class0" / "003.png")}]}})
    assert code == 200 and len(columns["outputs"]["class_ids"]) == 2
    assert columns["outputs"]["class_ids"][0] == rows["predictions"][0]["class_ids"]
    array = np.asarray(Image.open(root / "class2" / "005.png")).tolist()
    code, arrays = call(f"{url}/v1/models/colors:predict", {"signature_name": "serve_images", "instances": [array]})
    assert code == 200 and arrays["predictions"][0]["class_names"] in ("class0", "class1", "class2")
    code, classified = call(f"{url}/v1/models/colors:classify", {"examples": [{"image_bytes": {"b64": png_b64(big)}}]})
    assert code == 200 and [c for c, _ in classified["results"][0]] == ["class0", "class1", "class2"]
    code, labelled = call(f"{url}/v1/models/colors:classify", {"context": {"source": "x"}, "examples": [
        {"image_bytes": {"b64": png_b64(big)}, "label": 1}]})  # features beyond the inputs: ignored, as by TF Serving
    assert code == 200 and labelled == classified
    assert sum(p for _, p in classified["results"][0]) == pytest.approx(1.0, abs=1e-5)


def test_what_tf_serving_clients_send_is_read_as_tf_serving_reads_it(server, image_run):
    """A gzip body (TF Serving decompresses it), base64 wrapped at 76 columns (Java's MIME encoder,
    Python's encodebytes) or without its padding, and a percent-encoded model name: the same answer."""
    url, _ = server
    _, root = image_run
    raw = open(root / "class1" / "010.png", "rb").read()
    code, expected = call(f"{url}/v1/models/colors:predict", {"instances": [{"b64": base64.b64encode(raw).decode()}]})
    assert code == 200
    wrapped = base64.encodebytes(raw).decode()
    assert "\n" in wrapped.strip()
    assert call(f"{url}/v1/models/colors:predict", {"instances": [{"b64": wrapped}]}) == (200, expected)
    body = json.dumps({"instances": [{"b64": base64.b64encode(raw).decode()}]}).encode()
    assert call(f"{url}/v1/models/colors:predict", raw=gzip.compress(body),
                headers={"Content-Encoding": "gzip"}) == (200, expected)
    assert call(f"{url}/v1/models/c%6flors/versions/1:predict", raw=body) == (200, expected)
    other = next(open(p, "rb").read() for p in sorted(root.glob("*/*.png")) if p.stat().st_size % 3)
    unpadded = base64.b64encode(other).decode()
    assert unpadded.endswith("=")
    assert (call(f"{url}/v1/models/colors:predict", {"instances": [{"b64": unpadded.rstrip("=")}]})
            == call(f"{url}/v1/models/colors:predict", {"instances": [{"b64": unpadded}]}))
    code, answer = call(f"{url}/v1/models/colors:predict", raw=b"not gzip", headers={"Content-Encoding": "gzip"})
    assert code == 400 and "cannot decode the request body" in answer["error"]
    code, answer = call(f"{url}/v1/models/colors:predict", raw=gzip.compress(body)[:-4],
                        headers={"Content-Encoding": "gzip"})  # cut short
    assert (code, answer["error"]) == (400, "cannot decode the request body: not gzip (incomplete or truncated "
                                            "stream)")
    # TF Serving decodes gzip only; aiohttp's parser used to answer br with "Please install `Brotli`", and a
    # deflate body under 8 bytes with {"error": "deflate"}
    for raw, encoding in ((zlib.compress(body), "deflate"), (b"{}", "deflate"), (b"x" * 5000, "br")):
        code, answer = call(f"{url}/v1/models/colors:predict", raw=raw, headers={"Content-Encoding": encoding})
        assert code == 415 and answer["error"] == (f"Content-Encoding {encoding!r} is not supported; send gzip or an "
                                                   "uncompressed body")


def test_single_output_and_bytes_outputs_are_formatted_as_tf_serving_does():
    """json_tensor.cc: one output is its value alone (no name), in both formats; an output named
    *_bytes is {"b64": ...}; other strings are text."""
    one = {"y": np.array([2.0, 5.0], np.float32)}
    assert format_predictions(one, "row") == {"predictions": [2.0, 5.0]}
    assert format_predictions(one, "columnar") == {"outputs": [2.0, 5.0]}
    two = {"y": np.array([[1], [2]]), "out_bytes": np.array([b"\xff\x00a", b"b"], object),
           "text": np.array(["é".encode(), b"c"], object)}
    assert format_predictions(two, "row")["predictions"][0] == {"y": [1], "out_bytes": {"b64": "/wBh"}, "text": "é"}
    assert format_predictions(two, "columnar")["outputs"]["out_bytes"] == [{"b64": "/wBh"}, {"b64": "Yg=="}]
    assert list(format_predictions(two, "row")["predictions"][0]) == ["out_bytes", "text", "y"]  # name order
    assert list(format_predictions(two, "columnar")["outputs"]) == ["out_bytes", "text", "y"]


@pytest.mark.parametrize("path, body, raw, code, message", [
    ("/v1/models/colors:predict", None, b"{not json", 400, "JSON Parse error"),
    ("/v1/models/nope:predict", {"instances": [1]}, None, 404, "Servable not found"),
    ("/v1/models/colors/versions/9:predict", {"instances": [1]}, None, 404, "Servable not found"),
    ("/v1/models/colors:predict", {"instances": [{"b64": "!!!"}]}, None, 400, "invalid base64"),
    ("/v1/models/colors:predict", {"instances": [[1, 2, 3]]}, None, 400, "expected strings"),
    ("/v1/models/colors:predict", {"signature_name": "serve_images", "instances": [[[1, 2]]]}, None, 400, "shape"),
    ("/v1/models/colors:predict", {"instances": [{"b64": base64.b64encode(b"not an image").decode()}]}, None, 400,
     "instance 0: not a PNG, JPEG, GIF or BMP image"),
    ("/v1/models/colors:predict", {"instances": [{"b64": base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(40)).decode()}]},
     None, 400, "could not decode the image (Invalid PNG"),
    ("/v1/models/colors:predict", {"instances": []}, None, 400, "non-empty"),
    ("/v1/models/colors:predict", {"signature_name": "serve_images", "instances": [[[[1, 2, 3]]], [[[1, 2, 3],
     [4, 5, 6]]]]}, None, 400, "input 'image': instances of different shapes: instance 0 is [1, 1, 3], instance 1 "
     "[1, 2, 3]; the signature takes [10, 12, 3] each"),  # not numpy's "inhomogeneous shape after 1 dimensions"
    ("/v1/models/colors:predict", {"instances": ["ok", "a\ud800"]}, None, 400,
     "input 'image_bytes': instance 1: '\\ud800' at character 1 is not Unicode text (a lone surrogate)"),
    ("/v1/models/colors:predict", {"instances": [{"image_bytes": {"b64": "AA=="}}, {"image_bytes": {"b64": "AA=="},
     "image_bytez": {"b64": "AA=="}}]}, None, 400,  # a misspelled input is refused, as TF Serving does
     "instance 1: unknown input 'image_bytez'; the signature takes image_bytes"),
    ("/v1/models/colors:predict", {"inputs": {"image_bytes": []}}, None, 400,
     "input 'image_bytes' must hold at least one instance"),
    ("/v1/models/colors:predict", {"inputs": []}, None, 400, "input 'image_bytes' must hold at least one instance"),
    ("/v1/models/colors:predict", {"signature_name": ["a"], "instances": ["a"]}, None, 400,
     """'signature_name' key must be a string value, not ["a"]"""),
    ("/v1/models/colors:classify", {"context": [1], "examples": [{}]}, None, 400,
     "'context' must be a JSON object of features"),
    ("/v1/models/colors:predict", {"instances": [1], "inputs": [1]}, None, 400, "exactly one of"),
    ("/v1/models/colors:predict", {"signature_name": "nope", "instances": [1]}, None, 400,
     'Serving signature name: "nope" not found'),
    ("/v1/nothing", None, None, 400, "Malformed request: GET /v1/nothing"),
    ("/nothing", None, None, 404, "no such endpoint"),
])
def test_bad_requests_get_4xx_with_an_error(server, path, body, raw, code, message):
    url, _ = server
    status, answer = call(f"{url}{path}", body, raw)
    assert status == code and message in answer["error"]
    assert call(f"{url}/v1/models/colors")[0] == 200  # and the server is still fine


def test_an_image_that_cannot_be_decoded_in_a_batch_is_named_by_its_instance(server, image_run):
    """A batch of a good PNG, a truncated JPEG and another good PNG: the answer said "could not
    decode the image (…)" with no instance, leaving the client to find the file among many."""
    url, _ = server
    _, root = image_run
    good = png_b64(sorted(root.glob("class0/*.png"))[0])
    truncated = io.BytesIO()
    Image.fromarray(np.full((10, 12, 3), 90, np.uint8)).save(truncated, "JPEG")
    bad = base64.b64encode(truncated.getvalue()[:40]).decode()
    for path, body in [("predict", {"instances": [{"b64": good}, {"b64": bad}, {"b64": good}]}),
                       ("classify", {"examples": [{"b64": good}, {"b64": bad}]})]:
        status, answer = call(f"{url}/v1/models/colors:{path}", body)
        assert status == 400 and answer["error"].startswith("instance 1: could not decode the image ("), answer
    status, answer = call(f"{url}/v1/models/colors:predict", {"instances": [{"b64": good}, {"b64": good}]})
    assert status == 200 and len(answer["predictions"]) == 2


def test_classify_merges_the_context_into_every_example(server, image_run):
    """TF Serving's `context`: its features go into every example, and an example's own features win."""
    url, _ = server
    _, root = image_run
    big, other = png_b64(root / "class1" / "010.png"), png_b64(root / "class0" / "003.png")
    code, alone = call(f"{url}/v1/models/colors:classify",
                       {"examples": [{"image_bytes": {"b64": big}}, {"image_bytes": {"b64": other}}]})
    assert code == 200 and alone["results"][0] != alone["results"][1]  # two answers, so a mix-up shows
    code, merged = call(f"{url}/v1/models/colors:classify",
                        {"context": {"image_bytes": {"b64": big}}, "examples": [{}, {"image_bytes": {"b64": other}}]})
    assert code == 200 and merged == alone


def test_a_language_model_refuses_classify_and_bad_settings_before_running(language_run, monkeypatch):  # noqa: F811
    """A gpt has no classification signature: REST :classify is TF Serving's 400 (gRPC's words), and
    like a generate setting kcp generate refuses (top_k < 0), it is answered before any model call."""
    import grpc
    from tensorflow_serving.apis import classification_pb2, prediction_service_pb2_grpc

    httpd = make_server(language_run, "127.0.0.1", 0, grpc_port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1/models/model"
    calls = []
    monkeypatch.setattr(httpd.registry, "submit", lambda *a: calls.append(a[1]))  # None: then `call`, also spied
    monkeypatch.setattr(httpd.registry, "call", lambda *a: calls.append(a[1]) or {})
    settings = {"max_new_tokens": 4, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 1}
    wrong = ("Expected classification signature method_name to be tensorflow/serving/classify. "
             "Was: tensorflow/serving/predict")
    try:
        assert call(f"{url}:classify", {"examples": [{"texts": "the cat"}]}) == (400, {"error": wrong})
        assert call(f"{url}:classify", {"signature_name": "generate",
                                        "examples": [{"prompts": "a", **settings}]}) == (400, {"error": wrong})
        assert call(f"{url}:predict", {"signature_name": "generate",
                                       "inputs": {"prompts": [], **settings}}) == (
            400, {"error": "input 'prompts' must hold at least one instance (it is empty)"})
        assert calls == []  # refused before the model ran
        monkeypatch.undo()
        for name, value, message in (("top_k", -3, "top_k must be 0 (off) or more"),
                                     ("temperature", -1.0, "temperature must be 0 or more"),
                                     ("top_p", 1.5, "top_p must be at most 1")):  # as kcp generate refuses it
            assert call(f"{url}:predict", {"signature_name": "generate", "instances": [
                {"prompts": "a", **settings, name: value}]}) == (400, {"error": message})  # no trailing blanks
        request = classification_pb2.ClassificationRequest()
        request.model_spec.name = "model"
        request.input.example_list.examples.add()
        with grpc.insecure_channel(f"127.0.0.1:{httpd.grpc.port}") as channel:
            with pytest.raises(grpc.RpcError) as error:
                prediction_service_pb2_grpc.PredictionServiceStub(channel).Classify(request, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error.value.details() == wrong
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_request_size_is_limited(image_run):
    run_dir, _ = image_run
    httpd = make_server(run_dir, "127.0.0.1", 0, max_request_bytes=1000, allow_unvalidated=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        status, answer = call(f"http://127.0.0.1:{httpd.server_address[1]}/v1/models/colors:predict",
                              {"instances": ["x" * 5000]})
        assert status == 413 and "exceeds the limit" in answer["error"]
        bomb = gzip.compress(json.dumps({"instances": ["x" * 100_000]}).encode())  # small, but not once decoded
        assert len(bomb) < 1000
        status, answer = call(f"http://127.0.0.1:{httpd.server_address[1]}/v1/models/colors:predict", raw=bomb,
                              headers={"Content-Encoding": "gzip"})
        assert status == 413 and "exceeds the limit of 1000 bytes" in answer["error"]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_concurrent_requests_are_batched(server, image_run, monkeypatch):
    """Small POSTs are answered on the event loop, their calls awaited in the batcher: no pool
    thread runs them (`respond` is the pool's entry), and the answers equal the pool's."""
    url, httpd = server
    _, root = image_run
    in_pool = []
    monkeypatch.setattr(rest, "respond", lambda *args: in_pool.append(args[1:3]) or respond(*args))
    body = {"instances": [{"b64": png_b64(root / "class0" / "003.png")}]}
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: call(f"{url}/v1/models/colors:predict", body), range(48)))
    assert all(code == 200 for code, _ in answers)
    assert len({json.dumps(a["predictions"]) for _, a in answers}) == 1
    batcher = httpd.registry.models["colors"][1].batchers["serving_default"]
    assert batcher.batches_run < 48  # several requests shared a model call
    assert in_pool == []
    assert batcher.in_flight == 0
    assert call(f"{url}/v1/models/colors")[0] == 200 and in_pool == [("GET", "/v1/models/colors")]  # GETs: the pool
    pool_code, pool_answer = respond(httpd.registry, "POST", "/v1/models/colors:predict", json.dumps(body).encode())
    assert pool_code == 200 and json.loads(pool_answer)["predictions"] == answers[0][1]["predictions"]


def test_a_new_version_replaces_the_old_and_a_deleted_one_stops_being_served(server, image_run):
    url, httpd = server
    run_dir, _ = image_run
    assert cli.main(["export", "--run-dir", run_dir]) == 0
    try:
        wait_for(lambda: httpd.registry.served().get("colors") == [2])  # the next scan (0.1 s here)
        code, body = call(f"{url}/v1/models/colors")  # TF Serving's default policy: the latest version only;
        assert code == 200 and [(s["version"], s["state"]) for s in body["model_version_status"]] == [
            ("2", "AVAILABLE"), ("1", "END")]  # the one unloaded stays in the status, END; newest first, as
        # ServableStateMonitor's VersionMap (std::greater) orders them: a check of [0] sees the served one
        assert call(f"{url}/v1/models/colors/versions/2:predict", {"instances": [[1, 2]]})[0] == 400  # v2 found
        assert call(f"{url}/v1/models/colors/versions/1:predict", {"instances": [[1, 2]]})[0] == 404
    finally:
        shutil.rmtree(os.path.join(run_dir, "export", "colors", "2"))
    wait_for(lambda: httpd.registry.served().get("colors") == [1])  # the background scan, no request needed
    assert call(f"{url}/v1/models/colors/versions/2:predict", {"instances": [[1, 2]]})[0] == 404
    code, body = call(f"{url}/v1/models/colors")
    assert [(s["version"], s["state"]) for s in body["model_version_status"]] == [("2", "END"), ("1", "AVAILABLE")]
    assert call(f"{url}/v1/models/colors/versions/2")[1]["model_version_status"][0]["state"] == "END"


def test_batch_prediction_matches_the_server(server, image_run, tmp_path):
    """Sharded JSON lines that agree with the server; a corrupt image is one dead letter, not a failed job."""
    url, _ = server
    run_dir, root = image_run
    folder = tmp_path / "images"
    shutil.copytree(root, folder)
    (folder / "class1" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    prefix = str(tmp_path / "out" / "predictions")
    assert cli.main(["predict", "--run-dir", run_dir, "--input", f"folder:{folder}", "--output", prefix + ".jsonl",
                     "--", *IN_PROCESS_BEAM]) == 0
    shards = sorted((tmp_path / "out").glob("predictions-*-of-*.jsonl"))
    assert shards and all(str(p).endswith(f"-of-{len(shards):05d}.jsonl") for p in shards)
    lines = sorted((json.loads(line) for p in shards for line in p.read_text().splitlines()), key=lambda l: l["key"])
    assert len(lines) == 90 and "class1/corrupt.png" not in {line["key"] for line in lines}
    dead = [json.loads(line) for p in (tmp_path / "out").glob("predictions.dead_letter-*.jsonl")
            for line in p.read_text().splitlines()]
    assert [d["key"] for d in dead] == ["class1/corrupt.png"] and "not a decodable image" in dead[0]["reason"]
    for line in lines[:12]:
        code, answer = call(f"{url}/v1/models/colors:predict", {"instances": [{"b64": png_b64(root / line["key"])}]})
        assert code == 200
        assert answer["predictions"][0]["class_ids"] == line["class_id"]
        assert answer["predictions"][0]["class_names"] == line["class_name"]
        assert max(answer["predictions"][0]["probabilities"]) == pytest.approx(line["probability"], abs=1e-6)
    single = str(tmp_path / "one.jsonl")
    assert cli.main(["predict", "--run-dir", run_dir, "--input", f"folder:{folder}", "--output", single, "--single-file",
                     "--", *IN_PROCESS_BEAM]) == 0
    assert sorted(json.loads(line)["key"] for line in open(single)) == [line["key"] for line in lines]
    dead = [json.loads(line) for line in open(tmp_path / "one.dead_letter.jsonl")]  # PREFIX.dead_letter.jsonl
    assert [d["key"] for d in dead] == ["class1/corrupt.png"]


def test_batch_prediction_retries_a_failed_batch_one_input_at_a_time():
    """Only the input whose prediction fails becomes a dead letter; the rest of its batch is predicted."""
    from deploy.predict import PredictFn
    from kcp.core.beamio import DEAD_LETTER, EXAMPLE

    class Handler:
        def run_inference(self, batch, model):
            if "bad" in batch:
                raise ValueError("cannot predict bad\nmore detail")
            return [{"probabilities": np.array([0.25, 0.75])} for _ in batch]

    predict = PredictFn("unused", "serving_default", "text", ("neg", "pos"), "csv:x.csv")
    predict._handler, predict._model = Handler(), object()
    out = list(predict.process([("a", "good"), ("b", "bad"), ("c", "fine")]))
    assert [tag for tag, _ in out] == [EXAMPLE, DEAD_LETTER, EXAMPLE]
    assert json.loads(out[0][1]) == {"key": "a", "class_id": 1, "class_name": "pos", "probability": 0.75}
    assert json.loads(out[1][1])["reason"] == "prediction failed (ValueError: cannot predict bad)"


def test_server_close_releases_the_loaded_versions_and_their_threads(image_run):
    """A notebook starts and stops servers many times: `with` (shutdown, then server_close) leaves no
    batching thread, scanner or loaded model behind."""
    run_dir, root = image_run

    def kcp_threads():
        return {t for t in threading.enumerate() if t.name.endswith("(_loop)") or t.name == "kcp-serve-scan"}

    before = kcp_threads()
    with make_server(run_dir, "127.0.0.1", 0, allow_unvalidated=True, poll_seconds=0.1) as httpd:
        threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        assert call(f"{url}/v1/models/colors:predict", {"instances": [{"b64": png_b64(root / "class0" / "003.png")}]})[0] == 200
        assert len(kcp_threads() - before) >= 2  # the scanner and a batcher
    wait_for(lambda: not kcp_threads() - before, seconds=5)
    assert httpd.registry.models == {}


def test_rows_of_one_feature_a_step_are_refused_as_tf_serving_does_with_how_to_send_them():
    """A model trained on an npz of [N, 60] series takes [None, 60, 1]: `kcp predict` reads the rows
    as they are, but REST answered only that [2, 60] does not match, leaving the client to guess."""
    from deploy.serving.codec import RequestError, to_tensor

    spec = tf.TensorSpec([None, 60, 1], tf.float32)
    with pytest.raises(RequestError) as raised:
        to_tensor("sequence", [[0.5] * 60, [1.0] * 60], spec)
    assert str(raised.value) == ("input 'sequence': shape [2, 60] does not match the signature's [None, 60, 1]; each "
                                 "step goes in a list of its own, [[v1], [v2], …], one feature a step")
    assert to_tensor("sequence", [[[0.5]] * 60] * 2, spec).shape == (2, 60, 1)
    with pytest.raises(RequestError) as raised:  # another shape: no such hint
        to_tensor("sequence", [[0.5] * 59] * 2, spec)
    assert str(raised.value) == "input 'sequence': shape [2, 59] does not match the signature's [None, 60, 1]"
