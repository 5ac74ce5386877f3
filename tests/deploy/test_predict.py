"""Batch prediction and serving of sequences: input shapes, NaN and infinite values, failure counts;
batch prediction of inputs without labels (an npz of x alone, a folder without class folders)."""

import base64
import json
import math
import os
import shutil
import threading

import grpc
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from deploy.serving import make_server
from deploy.serving.routes import ok_answer
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
    for name, shape in (("big", (4, 16, 16, 1)), ("colour", (4, 8, 8, 3))):  # digits takes [8, 8, 1]
        np.savez(tmp_path / f"{name}.npz", x=np.zeros(shape, np.uint8), y=np.zeros(4, np.int64))
        code, output = predict(digits_run, f"npz:{tmp_path / name}.npz", tmp_path / name, capsys)
        assert code == 2 and f"holds inputs of shape {list(shape[1:])}; the model takes [8, 8, 1]" in output
    np.savez(tmp_path / "rgba.npz", x=np.zeros((4, 8, 8, 4), np.uint8), y=np.zeros(4, np.int64))  # no model takes it
    code, output = predict(digits_run, f"npz:{tmp_path / 'rgba.npz'}", tmp_path / "rgba", capsys)
    assert code == 2 and "image x has 4 channels ([4, 8, 8, 4]); images have 1 (grayscale) or 3 (RGB)" in output
    np.savez(tmp_path / "series.npz", x=x)  # float series [80, 20, 3] to the image model: not "save them as uint8"
    code, output = predict(digits_run, f"npz:{tmp_path / 'series.npz'}", tmp_path / "series", capsys)
    assert code == 2 and output.strip().splitlines()[-1] == (
        f"kcp predict: error: --input: npz:{tmp_path / 'series.npz'} holds sequence, the model takes image")


def test_predict_names_the_modality_before_the_sources_own_columns(digits_run, sequence_run, tmp_path, capsys):
    """A table for an image model is refused as text, not for lacking a `text` column."""
    (tmp_path / "new.csv").write_text("review text,other\ngood,1\n")
    code, output = predict(digits_run, f"csv:{tmp_path / 'new.csv'}", tmp_path / "out" / "c", capsys)
    assert code == 2 and f"--input: csv:{tmp_path / 'new.csv'} holds text, the model takes image" in output
    (tmp_path / "images").mkdir()
    code, output = predict(sequence_run[0], f"folder:{tmp_path / 'images'}", tmp_path / "out" / "f", capsys)
    assert code == 2 and f"--input: folder:{tmp_path / 'images'} holds image, the model takes sequence" in output
    assert not (tmp_path / "out").exists()


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
    assert sorted(d["reason"] for d in dead) == [f"sequence holds NaN or infinite values ({value} at {place}); fill "
                                                 "missing values, and pad shorter series with a number such as 0, not "
                                                 "NaN" for value, place in (("inf", [0, 0]), ("nan", [3, 2]))]
    predicted = [json.loads(line) for line in (tmp_path / "preds-00000-of-00001.jsonl").read_text().splitlines()]
    assert sorted(p["key"] for p in predicted) == ["all/0000000", "all/0000002"]
    code, output = predict(run_dir, f"npz:{tmp_path / 'bad.npz'}", tmp_path / "again", capsys)
    assert "[predict] predicted 2, failed 2 ->" in output  # counted per job, not per process

    # the same OUTPUT again, on inputs that all predict: no earlier dead letters or killed job's temp left
    (tmp_path / "beam-temp-preds-0123456789abcdef0123456789abcdef").mkdir()  # a killed job's
    # another job's, under PREFIX-2024 (in shard counts other than this job's: Beam's WriteToText itself
    # deletes PREFIX-*-of-00001.jsonl when it writes one shard)
    others = ["preds-2024-00000-of-00002.jsonl", "preds-2024.dead_letter-00000-of-00002.jsonl",
              "beam-temp-preds-2024-0123456789abcdef0123456789abcdef"]
    for name in others:
        (tmp_path / name).write_text("{}\n")
    np.savez(tmp_path / "good.npz", x=x[:3], y=np.zeros(3, np.int64))
    code, output = predict(run_dir, f"npz:{tmp_path / 'good.npz'}", tmp_path / "preds", capsys)
    assert code == 0 and "[predict] predicted 3, failed 0" in output
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(("preds", "beam-temp-preds"))) \
        == sorted(["preds-00000-of-00001.jsonl", *others])
    assert len((tmp_path / "preds-00000-of-00001.jsonl").read_text().splitlines()) == 3


def test_predict_names_classes_as_the_export_does_not_as_a_later_contract(sequence_run, tmp_path, capsys):
    """The run's data preprocessed again since the export, with its classes in another order (or
    other classes): the lines name each class as the export (and `kcp serve`) does."""
    source, x = sequence_run
    run_dir = str(tmp_path / "run")
    shutil.copytree(source, run_dir)
    metadata = tmp_path / "run" / "data" / "metadata.json"
    contract = json.loads(metadata.read_text())
    assert contract["class_names"] == ["0", "1"]
    metadata.write_text(json.dumps({**contract, "class_names": ["1", "0"]}))  # as a later preprocess could
    np.savez(tmp_path / "rows.npz", x=x[:40])
    code, output = predict(run_dir, f"npz:{tmp_path / 'rows.npz'}", tmp_path / "preds", capsys)
    assert code == 0, output
    served = tf.saved_model.load(f"{source}/export/model/1").signatures["serving_default"](
        sequence=tf.constant(x[:40]))
    expected = [name.decode() for name in served["class_names"].numpy()]
    lines = predictions(tmp_path / "preds")
    assert [lines[f"all/{index:07d}"]["class_name"] for index in range(40)] == expected
    assert {line["class_name"] == str(line["class_id"]) for line in lines.values()} == {True}


@pytest.mark.parametrize("recorded", [None, "image"])
def test_predict_reads_input_as_the_export_takes_it_after_the_run_is_preprocessed_again(sequence_run, tmp_path,
                                                                                         capsys, recorded):
    """The run's data preprocessed again, from a table of text, before a new training: predict still
    reads --input as the sequence model it runs takes it (not as the text RUN/data now describes)."""
    source, x = sequence_run
    run_dir = str(tmp_path / "run")
    shutil.copytree(source, run_dir)
    (tmp_path / "reviews.csv").write_text("text,label\n" + "good film,pos\nbad plot,neg\n" * 30)
    assert cli.main(["preprocess", "--run-dir", run_dir, "--source", f"csv:{tmp_path / 'reviews.csv'}", "--",
                     *IN_PROCESS_BEAM]) == 0
    assert json.loads((tmp_path / "run" / "data" / "metadata.json").read_text())["modality"] == "text"
    if recorded:  # preprocessed again from images with data.modality given: recorded in config.yaml
        np.savez(tmp_path / "images.npz", x=np.zeros((60, 6, 6), np.uint8) + np.arange(60, dtype=np.uint8)[:, None, None],
                 y=np.arange(60) % 2)
        assert cli.main(["preprocess", "--run-dir", run_dir, "--source", f"npz:{tmp_path / 'images.npz'}", "--set",
                         f"data.modality={recorded}", "--", *IN_PROCESS_BEAM]) == 0
    np.savez(tmp_path / "rows.npz", x=x[:5])
    code, output = predict(run_dir, f"npz:{tmp_path / 'rows.npz'}", tmp_path / "preds", capsys)
    assert code == 0 and "[predict] predicted 5, failed 0" in output, output
    served = tf.saved_model.load(f"{source}/export/model/1").signatures["serving_default"](
        sequence=tf.constant(x[:5]))
    lines = predictions(tmp_path / "preds")
    assert [lines[f"all/{index:07d}"]["class_id"] for index in range(5)] == served["class_ids"].numpy().tolist()
    (tmp_path / "new.csv").write_text("text\ngreat film\n")
    code, output = predict(run_dir, f"csv:{tmp_path / 'new.csv'}", tmp_path / "texts", capsys)
    assert code == 2 and f"--input: csv:{tmp_path / 'new.csv'} holds text, the model takes sequence" in output
    assert not list(tmp_path.glob("texts*"))


def test_a_runner_option_beam_refuses_is_one_line_and_keeps_the_earlier_predictions(sequence_run, tmp_path, capsys):
    run_dir, x = sequence_run
    np.savez(tmp_path / "rows.npz", x=x[:3])
    earlier = tmp_path / "preds-00000-of-00001.jsonl"
    earlier.write_text("{}\n")
    assert cli.main(["predict", "--run-dir", run_dir, "--input", f"npz:{tmp_path / 'rows.npz'}", "--output",
                     str(tmp_path / "preds"), "--", "--runner", "NoSuchRunner"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("kcp predict: error: Beam options: Unexpected pipeline runner")
    assert earlier.read_text() == "{}\n"


def test_predict_refuses_an_output_that_is_a_folder_and_names_input_in_its_errors(sequence_run, tmp_path, capsys):
    from kcp import api
    from kcp.core.errors import UserError

    run_dir, x = sequence_run
    np.savez(tmp_path / "x.npz", x=x[:2])
    for output in (f"{tmp_path}/", str(tmp_path)):
        code, said = predict(run_dir, f"npz:{tmp_path / 'x.npz'}", output, capsys)
        assert code == 2 and f"--output: {output} is a folder; give a file prefix inside it, such as " \
                              f"{tmp_path}/predictions" in said, said
    code, said = predict(run_dir, f"npz:{tmp_path / 'missing.npz'}", tmp_path / "p", capsys)
    assert code == 2 and f"kcp predict: error: --input: {tmp_path / 'missing.npz'}" in said, said
    with pytest.raises(UserError, match=r"^--input: expected a source such as folder:PATH, csv:FILE or npz:FILE, "
                                        r"got None$"):
        api.predict(run_dir, None, str(tmp_path / "p"))
    with pytest.raises(UserError, match=r"^--output: expected a file prefix such as preds/p, got 5$"):
        api.predict(run_dir, f"npz:{tmp_path / 'x.npz'}", 5)


def test_predict_never_removes_its_input_nor_another_jobs_output_and_names_an_unwritable_one(sequence_run, tmp_path,
                                                                                             capsys):
    """--output naming the --input file deleted it (the earlier outputs are cleared before the job
    reads); a second job on a prefix in use deleted the first one's files; a parent that is a file
    was a traceback; and a single-file job left an earlier sharded job's files beside its own."""
    run_dir, x = sequence_run
    source = tmp_path / "rows.npz"
    np.savez(source, x=x[:3])
    code = cli.main(["predict", "--run-dir", run_dir, "--input", f"npz:{source}", "--output", str(source),
                     "--single-file", "--", *IN_PROCESS_BEAM])
    said = capsys.readouterr().err
    assert code == 2 and said.strip() == (f"kcp predict: error: --output: {source} is an input this job reads; "
                                          "give the predictions another path"), said
    (tmp_path / "old.csv").write_text("a file of the user's, named as a sharded job's prefix\n")
    for output in (tmp_path / "rows.npz.jsonl", tmp_path / "old.csv"):  # sharded: PREFIX-*-of-*.jsonl
        code = cli.main(["predict", "--run-dir", run_dir, "--input", f"npz:{source}", "--output", str(output),
                         "--", *IN_PROCESS_BEAM])
        assert code == 0, capsys.readouterr().err
    assert np.load(source)["x"].shape == (3, 20, 3)  # still there, whole
    assert (tmp_path / "old.csv").read_text().startswith("a file of the user's")
    assert (tmp_path / "old.csv-00000-of-00001.jsonl").exists()

    (tmp_path / "file").write_text("not a folder")
    code, said = predict(run_dir, f"npz:{source}", tmp_path / "file" / "p", capsys)
    assert code == 2 and said.strip().splitlines()[-1] == (
        f"kcp predict: error: --output: cannot write in {tmp_path / 'file'} (Not a directory)"), said

    claim = tmp_path / ".kcp-predict-busy"  # a job on another host holds the prefix
    claim.mkdir()
    (claim / ".kcp-lock").write_text(json.dumps({"command": "predict", "user": "u", "host": "otherhost",
                                                 "pid": 123, "started": "2026-11-29T07:00:00Z", "token": "t"}))
    (tmp_path / "busy-00000-of-00001.jsonl").write_text("the other job's\n")
    code, said = predict(run_dir, f"npz:{source}", tmp_path / "busy", capsys)
    assert code == 2 and said.strip().splitlines()[-1].startswith(
        f"kcp predict: error: --output: {tmp_path / 'busy'} is being written by another job, `kcp predict` (pid "
        "123 on otherhost"), said
    assert (tmp_path / "busy-00000-of-00001.jsonl").read_text() == "the other job's\n"

    code, said = predict(run_dir, f"npz:{source}", tmp_path / "out", capsys)  # sharded, then single-file
    assert code == 0 and (tmp_path / "out-00000-of-00001.jsonl").exists()
    assert cli.main(["predict", "--run-dir", run_dir, "--input", f"npz:{source}", "--output",
                     str(tmp_path / "out.jsonl"), "--single-file", "--", *IN_PROCESS_BEAM]) == 0
    assert sorted(path.name for path in tmp_path.glob("out*")) == ["out.jsonl"]
    assert not (tmp_path / ".kcp-predict-out").exists()  # the lock goes with the job


@pytest.mark.parametrize("body", ['{"instances": [%s, %s]}', '{"inputs": {"sequence": [%s, %s]}}'])
@pytest.mark.parametrize("bad, message", [
    ("NaN", f"input 'sequence': instance 1 {NOT_FINITE}"),
    ("Infinity", f"input 'sequence': instance 1 {NOT_FINITE}"),
    ("1e39", "input 'sequence': instance 1 holds a value beyond float32's range (±3.402823e+38)"),
])
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


def test_rest_refuses_booleans_for_numbers(sequence_server, sequence_run):
    """JSON true/false used to become 1.0 and 0.0 here, where TF Serving refuses them."""
    url, _ = sequence_server
    _, x = sequence_run
    mixed = x[0].tolist()  # one true among numbers: NumPy reads [1.5, true] as [1.5, 1.0]
    last = mixed
    while isinstance(last[-1], list):
        last = last[-1]
    last[-1] = True
    for instance in ((x[0] > 0).tolist(), mixed):
        raw = json.dumps({"instances": [instance]}).encode()
        code, answer = call(f"{url}/v1/models/model:predict", raw=raw)
        assert (code, answer) == (400, {"error": "input 'sequence': expected numbers of dtype float32, got true/false"})


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


def predictions(prefix) -> dict:
    """{key: prediction line} of the shards `PREFIX-*-of-*.jsonl`."""
    shards = sorted(prefix.parent.glob(f"{prefix.name}-*-of-*.jsonl"))
    assert shards
    return {line["key"]: line for line in (json.loads(text) for path in shards for text in path.read_text().splitlines())}


def dead_letters(prefix) -> dict:
    """{key: reason} of the dead letters `PREFIX.dead_letter-*.jsonl`."""
    return {d["key"]: d["reason"] for path in prefix.parent.glob(f"{prefix.name}.dead_letter-*.jsonl")
            for d in map(json.loads, path.read_text().splitlines())}


def test_predict_takes_an_npz_without_y_and_names_values_beyond_float32(sequence_run, tmp_path, capsys):
    """x alone (nothing to label when predicting) gives the predictions of the same x with y; a float64
    value beyond float32's range is a dead letter that says so, not "NaN or infinite"."""
    run_dir, x = sequence_run
    rows = x[:6].astype(np.float64)
    rows[2, 5, 1] = 1e39
    np.savez(tmp_path / "labelled.npz", x=rows, y=np.arange(6) % 2)
    np.savez(tmp_path / "bare.npz", x=rows)
    for name in ("labelled", "bare"):
        code, output = predict(run_dir, f"npz:{tmp_path / name}.npz", tmp_path / name, capsys)
        assert code == 0 and "[predict] predicted 5, failed 1 ->" in output, output
    labelled, bare = predictions(tmp_path / "labelled"), predictions(tmp_path / "bare")
    assert sorted(bare) == ["all/0000000", "all/0000001", "all/0000003", "all/0000004", "all/0000005"]
    for key, line in labelled.items():
        assert (bare[key]["class_id"], bare[key]["class_name"]) == (line["class_id"], line["class_name"])
        assert bare[key]["probability"] == pytest.approx(line["probability"], abs=1e-6)
    served = tf.saved_model.load(f"{run_dir}/export/model/1").signatures["serving_default"](
        sequence=tf.constant(rows[[0, 1, 3, 4, 5]].astype(np.float32)))["probabilities"].numpy()
    assert [bare[key]["probability"] for key in sorted(bare)] == pytest.approx(served.max(axis=1), abs=1e-5)
    reason = "sequence value 1e+39 at [5, 1] is outside float32's range (±3.402823e+38)"
    assert dead_letters(tmp_path / "labelled") == dead_letters(tmp_path / "bare") == {"all/0000002": reason}

    # a test split alone, x_test, from a run whose config.yaml caps quick trials (data.limit: 2): that
    # cap is the run's preprocessing's, not the prediction's, so all six rows are read
    limited = shutil.copytree(run_dir, tmp_path / "limited_run")
    recorded = (limited / "config.yaml").read_text()
    assert "  limit: 0\n" in recorded
    (limited / "config.yaml").write_text(recorded.replace("  limit: 0\n", "  limit: 2\n"))
    np.savez(tmp_path / "test_only.npz", x_test=rows)
    code, output = predict(str(limited), f"npz:{tmp_path / 'test_only.npz'}", tmp_path / "test_only", capsys)
    assert code == 0 and "[predict] predicted 5, failed 1 ->" in output, output
    test_only = predictions(tmp_path / "test_only")
    assert {key.replace("test/", "all/"): line["class_id"] for key, line in test_only.items()} == \
        {key: line["class_id"] for key, line in bare.items()}


def test_predict_takes_a_folder_of_images_without_class_folders(digits_run, tmp_path, capsys):
    """Every image below the folder, in it or in any subfolder, keyed by its relative path: the
    predictions of the same files in class folders."""
    from kcp.core.sources.images import digits_to_uint8, load_digits_arrays

    images, targets = load_digits_arrays()
    pixels = digits_to_uint8(images[:12])[..., 0]
    flat = {}
    for index, array in enumerate(pixels):
        name = f"{index:02d}.png" if index < 8 else f"more/deeper/{index:02d}.png"  # nested: read too
        for path in (tmp_path / "classes" / str(targets[index]) / f"{index:02d}.png", tmp_path / "flat" / name):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)
        flat[name] = f"{targets[index]}/{index:02d}.png"
    (tmp_path / "flat" / "notes.txt").write_text("not an image: skipped")
    (tmp_path / "flat" / "empty").mkdir()
    for name in ("classes", "flat"):
        code, output = predict(digits_run, f"folder:{tmp_path / name}", tmp_path / "out" / name, capsys)
        assert code == 0 and "[predict] predicted 12, failed 0" in output, output
        skipped = "[predict] skipped: 1 file, not an image by its extension (not read), e.g. notes.txt"
        assert (skipped in output) == (name == "flat"), output  # said, as preprocess says it
    labelled, bare = predictions(tmp_path / "out" / "classes"), predictions(tmp_path / "out" / "flat")
    assert sorted(bare) == sorted(flat) and len(labelled) == 12
    for name in ("gone.png", "more/gone.png"):  # broken links, in the folder and below: dead letters, both
        os.symlink(tmp_path / "missing.png", tmp_path / "flat" / name)
    code, output = predict(digits_run, f"folder:{tmp_path / 'flat'}", tmp_path / "out" / "links", capsys)
    assert code == 0 and "[predict] predicted 12, failed 2" in output, output
    assert dead_letters(tmp_path / "out" / "links") == dict.fromkeys(  # the reason preprocess gives, not a traceback's
        ["gone.png", "more/gone.png"], f"a broken symbolic link (to {tmp_path / 'missing.png'}, which does not exist)")
    for key, line in bare.items():
        expected = labelled[flat[key]]
        assert (line["class_id"], line["class_name"]) == (expected["class_id"], expected["class_name"])
        assert line["probability"] == pytest.approx(expected["probability"], abs=1e-6)
    assert sum(bare[name]["class_name"] == label.split("/")[0] for name, label in flat.items()) >= 8  # a trained model


def test_predict_defaults_to_the_newest_blessed_version_and_names_a_damaged_export(sequence_run, tmp_path, capsys):
    """As kcp serve: an unvalidated newer version is not what batch prediction uses unless asked for;
    an export whose saved_model.pb is damaged is one line (exit 2) for predict and validate."""
    run_dir, x = sequence_run
    copy = shutil.copytree(run_dir, tmp_path / "run")
    root = copy / "export" / "model"
    assert json.loads((root / "1" / "assets.extra" / "validation.json").read_text())["blessed"] is True
    shutil.copytree(root / "1", root / "2")
    (root / "2" / "assets.extra" / "validation.json").unlink()  # exported, never validated
    np.savez(tmp_path / "rows.npz", x=x[:3])
    code, output = predict(str(copy), f"npz:{tmp_path / 'rows.npz'}", tmp_path / "default", capsys)
    assert code == 0 and "[predict] predicted 3, failed 0" in output, output
    assert ("version 2 is not blessed by `kcp validate`; predicting with version 1, the newest blessed one "
            "(--version 2 to use it)") in output
    assert f"through {root / '1'}" in output
    code = cli.main(["predict", "--run-dir", str(copy), "--input", f"npz:{tmp_path / 'rows.npz'}", "--output",
                     str(tmp_path / "second"), "--version", "2", "--", *IN_PROCESS_BEAM])
    output = capsys.readouterr().out
    assert code == 0 and f"through {root / '2'}" in output
    assert "[predict] version 2 is not blessed by `kcp validate`; predicting with it, as asked" in output
    assert predictions(tmp_path / "second") == predictions(tmp_path / "default")  # the same weights
    records = [root / version / "assets.extra" / "validation.json" for version in ("1", "2")]
    blessing = records[0].read_text()
    for record in records:  # validated again with a floor neither meets: nothing blessed, nothing served
        record.write_text(json.dumps({"blessed": False, "reasons": ["export accuracy 0.5000 is below "
                                                                    "export.min_accuracy 0.999"]}))
    code, output = predict(str(copy), f"npz:{tmp_path / 'rows.npz'}", tmp_path / "none", capsys)
    assert code == 0 and ("[predict] no version is blessed by `kcp validate` (export accuracy 0.5000 is below "
                          "export.min_accuracy 0.999); predicting with version 2, the newest, which `kcp serve` "
                          "would not serve") in output, output
    records[0].write_text(blessing)
    records[1].unlink()

    pb = (root / "2" / "saved_model.pb").read_bytes()
    (root / "2" / "saved_model.pb").write_bytes(pb[:1000])  # cut short, as a failed copy leaves it
    code = cli.main(["predict", "--run-dir", str(copy), "--input", f"npz:{tmp_path / 'rows.npz'}", "--output",
                     str(tmp_path / "third"), "--version", "2", "--", *IN_PROCESS_BEAM])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "kcp predict" in line]
    assert code == 2 and errors == [f"kcp predict: error: {root / '2'}: cannot load the SavedModel "
                                    f"({errors[0].split('(', 1)[1]}"] and "Traceback" not in captured.err
    code = cli.main(["validate", "--run-dir", str(copy), "--version", "2"])
    captured = capsys.readouterr()
    assert code == 2 and f"{root / '2'}: cannot load the SavedModel" in captured.err
    assert "Traceback" not in captured.err


def test_integer_series_are_predicted_as_the_sequence_model_takes_them(sequence_run, tmp_path, capsys):
    """An int npz x was planned as images (the run's data.modality is null): the contract's modality decides."""
    run_dir, x = sequence_run
    np.savez(tmp_path / "ints.npz", x=np.rint(x[:4] * 10).astype(np.int32))
    code, output = predict(run_dir, f"npz:{tmp_path / 'ints.npz'}", tmp_path / "ints", capsys)
    assert code == 0 and "[predict] predicted 4, failed 0" in output, output
