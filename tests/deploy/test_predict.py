"""Batch prediction and serving of sequences: input shapes, NaN and infinite values, failure counts."""

import base64
import json
import math
import threading

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from deploy.serving import make_server
from deploy.serving.rest import ok_answer
from kcp import cli
from tests.conftest import IN_PROCESS_BEAM
from tests.deploy.test_serving import call

NOT_FINITE = "holds NaN or infinite values"


@pytest.fixture(scope="module")
def sequence_run(tmp_path_factory):
    """A sequence model on x float32 [80, 20, 3] (npz), one epoch."""
    root = tmp_path_factory.mktemp("sequences")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 20, 3)).astype(np.float32)
    np.savez(root / "train.npz", x=x, y=(x[:, :, 0].mean(axis=1) > 0).astype(np.int64))
    run_dir = str(tmp_path_factory.mktemp("sequence_run"))
    assert cli.main(["run", "--source", f"npz:{root / 'train.npz'}", "--run-dir", run_dir, "--set", "train.epochs=1",
                     "--", *IN_PROCESS_BEAM]) == 0
    return run_dir, x


@pytest.fixture(scope="module")
def sequence_server(sequence_run):
    run_dir, _ = sequence_run
    httpd = make_server(run_dir, "127.0.0.1", 0, allow_unvalidated=True, grpc_port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    httpd.shutdown()
    httpd.server_close()


def predict(run_dir, source, output, capsys) -> tuple[int, str]:
    code = cli.main(["predict", "--run-dir", run_dir, "--input", source, "--output", str(output), "--",
                     *IN_PROCESS_BEAM])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_predict_refuses_arrays_of_another_shape_than_the_models(sequence_run, digits_run, tmp_path, capsys):
    run_dir, x = sequence_run
    np.savez(tmp_path / "flat.npz", x=x[:, :, 0], y=np.zeros(80, np.int64))  # [80, 20]: read as [20, 1]
    code, output = predict(run_dir, f"npz:{tmp_path / 'flat.npz'}", tmp_path / "out" / "z", capsys)
    assert code == 2
    assert (f"--input: npz:{tmp_path / 'flat.npz'} holds inputs of shape [20, 1]; the model takes [20, 3] "
            "(serving_default's input 'sequence')") in output
    assert not (tmp_path / "out").exists()
    for name, shape in (("big", (4, 16, 16, 1)), ("deep", (4, 8, 8, 4))):  # digits takes [8, 8, 1]
        np.savez(tmp_path / f"{name}.npz", x=np.zeros(shape, np.uint8), y=np.zeros(4, np.int64))
        code, output = predict(digits_run, f"npz:{tmp_path / name}.npz", tmp_path / name, capsys)
        assert code == 2 and f"holds inputs of shape {list(shape[1:])}; the model takes [8, 8, 1]" in output


def test_predict_counts_predictions_and_failures(sequence_run, tmp_path, capsys):
    run_dir, x = sequence_run
    rows = x[:4].copy()
    rows[1, 3, 2], rows[3, 0, 0] = np.nan, np.inf
    np.savez(tmp_path / "bad.npz", x=rows, y=np.zeros(4, np.int64))
    code, output = predict(run_dir, f"npz:{tmp_path / 'bad.npz'}", tmp_path / "preds", capsys)
    assert code == 0
    dead_file = tmp_path / "preds.dead_letter-00000-of-00001.jsonl"
    assert f"[predict] predicted 2, failed 2 -> {dead_file}" in output
    dead = [json.loads(line) for line in dead_file.read_text().splitlines()]
    assert sorted(d["key"] for d in dead) == ["all/0000001", "all/0000003"]
    assert {d["reason"] for d in dead} == {"sequence holds NaN or infinite values"}
    predicted = [json.loads(line) for line in (tmp_path / "preds-00000-of-00001.jsonl").read_text().splitlines()]
    assert sorted(p["key"] for p in predicted) == ["all/0000000", "all/0000002"]
    code, output = predict(run_dir, f"npz:{tmp_path / 'bad.npz'}", tmp_path / "again", capsys)
    assert "[predict] predicted 2, failed 2 ->" in output  # counted per job, not per process


@pytest.mark.parametrize("body, message", [
    ('{"instances": [%s, %s]}', f"input 'sequence': instance 1 {NOT_FINITE}"),
    ('{"inputs": {"sequence": [%s, %s]}}', f"input 'sequence': instance 1 {NOT_FINITE}"),
])
@pytest.mark.parametrize("bad", ["NaN", "Infinity", "1e39"])  # 1e39 is infinite as float32
def test_rest_refuses_instances_with_nan_or_infinite_values(sequence_server, sequence_run, body, message, bad):
    url, _ = sequence_server
    _, x = sequence_run
    good = json.dumps(x[0].tolist())
    poisoned = json.dumps(x[1].tolist()).replace(json.dumps(float(x[1, 5, 1])), bad, 1)
    raw = (body % (good, poisoned)).encode()
    code, answer = call(f"{url}/v1/models/model:predict", raw=raw)
    assert (code, answer) == (400, {"error": message})
    code, answer = call(f"{url}/v1/models/model:predict", raw=(body % (good, good)).encode())
    assert code == 200


def test_grpc_refuses_nan_as_invalid_argument(sequence_server, sequence_run):
    _, httpd = sequence_server
    _, x = sequence_run
    rows = x[:3].copy()
    rows[2, 0, 0] = np.nan
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "model"
    request.inputs["sequence"].CopyFrom(tf.make_tensor_proto(rows))
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{httpd.grpc.port}"))
    with pytest.raises(grpc.RpcError) as raised:
        stub.Predict(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == f"input 'sequence': instance 2 {NOT_FINITE}"


def test_no_answer_holds_a_bare_nan(sequence_server, sequence_run):
    """A tf.train.Example carrying NaN reaches the model (serve_examples): the answer is a 400 naming
    the output and the instance, strict JSON, not {"probabilities": [NaN, NaN]}."""
    from kcp.core import contract as contract_lib

    url, _ = sequence_server
    run_dir, _ = sequence_run
    contract = contract_lib.read_contract(run_dir)
    record = next(iter(tf.data.TFRecordDataset(contract.split_files(contract_lib.data_dir(run_dir), "test"))))
    example = tf.train.Example.FromString(record.numpy())
    example.features.feature["sequence"].float_list.value[7] = math.nan
    code, answer = call(f"{url}/v1/models/model:predict", {"signature_name": "serve_examples", "instances": [
        {"b64": base64.b64encode(example.SerializeToString()).decode()}]})
    assert code == 400 and answer["error"].endswith(f"instance 0 {NOT_FINITE}")
    assert answer["error"].startswith("output '")
    code, body = ok_answer({"probabilities": [math.nan]})  # whatever no check caught
    assert code == 400 and json.loads(body, parse_constant=lambda name: pytest.fail(f"bare {name}"))["error"]
