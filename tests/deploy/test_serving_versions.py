"""TF Serving's REST semantics case by case (docs/serving.md's table) and the version policy:
blessed versions only, labels, one load per version, failed loads recorded once, gs:// run dirs."""

import base64
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from deploy.serving import make_server
from kcp.core.errors import UserError
from tests.deploy.test_serving_hostile import digit_png

BODY = {"instances": [{"b64": base64.b64encode(digit_png()).decode()}]}


def bless(version_dir: str, blessed: bool | None) -> None:
    path = os.path.join(version_dir, "assets.extra", "validation.json")
    if blessed is None:
        if os.path.exists(path):
            os.remove(path)
    else:
        json.dump({"blessed": blessed, "reasons": [] if blessed else ["below export.min_accuracy"]}, open(path, "w"))


@pytest.fixture(scope="module")
def versions_run(digits_run, tmp_path_factory):
    """RUN/export/model/1 blessed, 2 not blessed, 3 never validated, 4 blessed but broken."""
    run_dir = str(tmp_path_factory.mktemp("versions_run"))
    source = os.path.join(digits_run, "export", "model", "1")
    for version, blessed in ((1, True), (2, False), (3, None), (4, True)):
        target = os.path.join(run_dir, "export", "model", str(version))
        shutil.copytree(source, target)
        bless(target, blessed)
    with open(os.path.join(run_dir, "export", "model", "4", "saved_model.pb"), "wb") as handle:
        handle.write(b"not a SavedModel")
    return run_dir


def start(run_dir, **options):
    httpd = make_server(run_dir, "127.0.0.1", 0, **options)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    return f"http://127.0.0.1:{httpd.server_address[1]}", httpd


def stop(httpd):
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def labelled(versions_run):
    url, httpd = start(versions_run, version_policy="all", version_labels=["stable=1"], poll_seconds=3600)
    yield url, httpd
    stop(httpd)


def call(url, method="GET", body=None):
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# (method, path, body, status, error text): TF Serving's answer to each, from its
# http_rest_api_handler.cc and http_rest_api_handler_test.cc; docs/serving.md lists the same.
CASES = [
    ("GET", "/v1/models", None, 400, "Missing model name in request."),
    ("POST", "/v1/models", b"{}", 400, "Malformed request: POST /v1/models"),
    ("GET", "/v1/foo", None, 400, "Malformed request: GET /v1/foo"),
    ("POST", "/v1/foo", b"{}", 400, "Malformed request: POST /v1/foo"),
    ("GET", "/v1/models/model:predict", None, 400, "Malformed request: GET /v1/models/model:predict"),
    ("POST", "/v1/models/model/metadata", b"{}", 400, "Malformed request: POST /v1/models/model/metadata"),
    ("POST", "/v1/models/model/versions/HELLO:predict", BODY, 400, "Malformed request"),
    ("POST", "/v1/models/model/version/1:predict", BODY, 400, "Malformed request"),
    ("POST", f"/v1/models/model/versions/{2**64 - 1}:regress", BODY, 400, "Failed to convert version"),
    ("PUT", "/v1/models/model", b"{}", 400, "Malformed request: PUT /v1/models/model"),
    ("POST", "/v1/models/model:predict", b"", 400, "JSON Parse error: The document is empty"),
    ("POST", "/v1/models/model:predict", b"instances = [1, 2]", 400, "JSON Parse error"),
    ("POST", "/v1/models/model:regress", {"examples": [{"x": 1.0}]}, 400,
     "Expected regression signature method_name to be tensorflow/serving/regress"),
    ("GET", "/v1/models/nope", None, 404, "Could not find any versions of model nope"),
    ("GET", "/v1/models/model/versions/9", None, 404, "Could not find version 9 of model model"),
    ("POST", "/v1/models/nope:predict", BODY, 404, "Servable not found for request: Latest(nope)"),
    ("POST", "/v1/models/model/versions/9:predict", BODY, 404, "Servable not found for request: Specific(model, 9)"),
    ("GET", "/v1/models/model/labels/nope", None, 400, "Unrecognized servable version label: nope"),
    ("POST", "/v1/models/model/labels/nope:predict", BODY, 400, "Unrecognized servable version label: nope"),
    ("GET", "/v1/models/model/versions/9/metadata", None, 404, "Servable not found for request: Specific(model, 9)"),
    ("POST", "/v1/models/model:predict", {"signature_name": "nope", "instances": [1]}, 400,
     'Serving signature name: "nope" not found in signature def'),
    ("GET", "/statuspage", None, 404, "no such endpoint"),
]


@pytest.mark.parametrize("method, path, body, code, message", CASES, ids=[f"{c[0]} {c[1][:60]}" for c in CASES])
def test_rest_answers_as_tf_serving(labelled, method, path, body, code, message):
    url, _ = labelled
    status, answer = call(url + path, method, body)
    assert status == code and message in answer["error"], answer


def test_labels_case_insensitive_routes_and_status_of_a_failed_load(labelled):
    url, httpd = labelled
    code, by_label = call(f"{url}/v1/models/model/labels/stable:predict", "POST", BODY)
    assert code == 200 and by_label == call(f"{url}/v1/models/model/versions/1:predict", "POST", BODY)[1]
    assert call(f"{url}/V1/Models/model/labels/stable/metadata")[1]["model_spec"]["version"] == "1"
    code, status = call(f"{url}/v1/models/model")
    assert code == 200 and [(s["version"], s["state"]) for s in status["model_version_status"]] == \
        [("4", "END"), ("1", "AVAILABLE")]  # newest first, as TF Serving lists them
    broken = status["model_version_status"][0]["status"]
    assert broken["error_code"] == "UNKNOWN" and broken["error_message"]
    loads = httpd.registry.loads
    for _ in range(5):  # requests never retry a failed load (a later scan does, with backoff)
        assert call(f"{url}/v1/models/model/versions/4:predict", "POST", BODY)[0] == 404
        assert call(f"{url}/v1/models/model/versions/4")[1]["model_version_status"][0]["state"] == "END"
    assert httpd.registry.loads == loads
    code, answer = call(f"{url}/v1/models/model/versions/2:predict", "POST", BODY)
    assert code == 404 and "not blessed by kcp validate" in answer["error"]
    code, answer = call(f"{url}/v1/models/model/versions/2")  # its status says why too, not only "Could not find"
    assert (code, answer["error"]) == (404, "Could not find version 2 of model model; it is not blessed by kcp "
                                            "validate (serve it with --allow-unvalidated)")


def test_only_blessed_versions_are_served_unless_allowed(versions_run):
    url, httpd = start(versions_run)  # the default: latest:1 among the blessed ones
    try:
        assert httpd.registry.served() == {"model": [1]}
        code, answer = call(f"{url}/v1/models/model/versions/3:predict", "POST", BODY)
        assert code == 404 and "--allow-unvalidated" in answer["error"]
        for version in (1, 4):  # nothing blessed left: the status says why
            bless(os.path.join(versions_run, "export", "model", str(version)), False)
        httpd.registry.scan()
        code, answer = call(f"{url}/v1/models/model")
        assert code == 404 and "versions [1, 2, 3, 4] are not blessed" in answer["error"]
    finally:
        for version in (1, 4):
            bless(os.path.join(versions_run, "export", "model", str(version)), True)
        stop(httpd)
    url, httpd = start(versions_run, allow_unvalidated=True, version_policy="specific:2,3")
    try:
        assert httpd.registry.served() == {"model": [2, 3]}
        assert call(f"{url}/v1/models/model:predict", "POST", BODY)[0] == 200
    finally:
        stop(httpd)


def test_concurrent_first_requests_load_a_new_version_once(labelled, versions_run):
    url, httpd = labelled  # poll_seconds=3600: only a request for a missing version rescans
    target = os.path.join(versions_run, "export", "model", "5")
    shutil.copytree(os.path.join(versions_run, "export", "model", "1"), target)
    try:
        time.sleep(0.6)  # past the rescan-on-miss interval
        loads = httpd.registry.loads
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: call(f"{url}/v1/models/model/versions/5:predict", "POST", BODY), range(8)))
        assert [code for code, _ in answers] == [200] * 8
        assert httpd.registry.loads == loads + 1
    finally:
        shutil.rmtree(target)


def test_a_labelled_version_loads_once_and_a_label_may_name_one_model(digits_run, tmp_path):
    """--version-label stable=1 labels version 1 of every model; model:canary=1 of `model` only (TF
    Serving's labels are per model). A labelled version the policy also serves is loaded once."""
    run_dir = str(tmp_path / "run")
    for name in ("model", "other"):
        shutil.copytree(os.path.join(digits_run, "export", "model", "1"), os.path.join(run_dir, "export", name, "1"))
        bless(os.path.join(run_dir, "export", name, "1"), True)
    url, httpd = start(run_dir, version_labels=["stable=1", "model:canary=1"])
    try:
        assert httpd.registry.loads == 2  # one load per model (each labelled version was loaded twice before)
        httpd.registry.scan()
        assert httpd.registry.loads == 2 and httpd.registry.served() == {"model": [1], "other": [1]}
        assert call(f"{url}/v1/models/other/labels/stable:predict", "POST", BODY)[0] == 200
        assert call(f"{url}/v1/models/model/labels/canary:predict", "POST", BODY)[0] == 200
        assert call(f"{url}/v1/models/other/labels/canary:predict", "POST", BODY) == (
            400, {"error": "Unrecognized servable version label: canary"})
    finally:
        stop(httpd)
    with pytest.raises(UserError, match=r"^--version-label 'a:b:c=1': use LABEL=VERSION or NAME:LABEL=VERSION"):
        make_server(run_dir, "127.0.0.1", 0, version_labels=["a:b:c=1"])


def test_a_remote_run_dir_is_served_or_fails_in_one_line(digits_run, gcs, tmp_path):
    bucket = gcs.bucket("kcp-test")
    source = os.path.join(digits_run, "export", "model", "1")

    def upload(version):
        for folder, _, files in os.walk(source):
            for name in files:
                relative = os.path.relpath(os.path.join(folder, name), source)
                bucket.blob(f"served-run/export/model/{version}/{relative}").upload_from_filename(
                    os.path.join(folder, name))
        for marker in ("", "variables/", "assets.extra/"):  # the empty folder objects TensorFlow's GCS client writes
            bucket.blob(f"served-run/export/model/{version}/{marker}").upload_from_string(b"")

    upload(1)
    url, httpd = start("gs://kcp-test/served-run", allow_unvalidated=True)
    staging = httpd.registry.staging
    try:
        assert httpd.registry.served() == {"model": [1]}
        assert call(f"{url}/v1/models/model:predict", "POST", BODY)[0] == 200
        upload(2)  # a push: version 2 is served, and version 1's local copy goes with its unloading
        httpd.registry.scan()
        assert httpd.registry.served() == {"model": [2]}
        assert os.listdir(os.path.join(staging, "model")) == ["2"]
        assert call(f"{url}/v1/models/model:predict", "POST", BODY)[0] == 200
        upload(3)  # damaged: version 2 stays, and the failure names the gs:// version, not the local copy
        bucket.blob("served-run/export/model/3/saved_model.pb").upload_from_string(b"not a SavedModel")
        httpd.registry.scan()
        assert httpd.registry.served() == {"model": [2]}
        error = httpd.registry.failures["model"][3].error
        assert error.startswith("gs://kcp-test/served-run/export/model/3: cannot load") and staging not in error
        assert os.listdir(os.path.join(staging, "model")) == ["2"]
    finally:
        stop(httpd)
    assert not os.path.exists(staging)
    with pytest.raises(UserError, match="cannot list the exports|no exports there") as raised:
        make_server("gs://no-such-bucket-kcp/run", "127.0.0.1", 0)
    assert "\n" not in str(raised.value)


def test_a_failed_background_scan_is_one_log_line_and_serving_goes_on(tmp_path, caplog):
    """Storage down under a gs:// server: each failed scan was a 130-line traceback in the log."""
    import logging

    from deploy.serving.registry import ModelRegistry

    registry = ModelRegistry(str(tmp_path), poll_seconds=0.1)
    stop, scans = threading.Event(), []

    def refresh(wait=False):
        scans.append(wait)
        if len(scans) == 2:
            stop.set()
        raise RuntimeError("Timeout of 120.0s exceeded, last exception: connection refused\n  File ...")

    registry.refresh = refresh
    with caplog.at_level(logging.INFO, logger="kcp.serve"):
        registry.poll_forever(stop)
    failed = [record for record in caplog.records if record.name == "kcp.serve"]
    assert [record.getMessage() for record in failed] == [
        "serve: scan failed: Timeout of 120.0s exceeded, last exception: connection refused"] * 2
    assert all(record.exc_info is None for record in failed)
