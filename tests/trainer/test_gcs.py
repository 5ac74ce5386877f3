"""TensorFlow's own gs:// filesystem under the trainer, export and validation, against the emulator.

tf.data reads the shards, Keras writes model.keras and its checkpoints, TensorBoard writes its
events and tf.saved_model writes the export, all through TensorFlow's GCS client talking to
gcp-storage-emulator through the `google_apis` TLS proxy (tests/gcs.py); the run's small files
(config, metrics, history) go through Beam's gcsio as everywhere else.
"""

import json
import os
import subprocess
import sys
from urllib.parse import unquote

from kcp import cli
from tests.conftest import fresh_run

RUN = "runs/tf-gcs"
SETTINGS = ["--set", "train.epochs=3", "--set", "train.learning_rate=0.005", "--set", "train.deterministic=true"]


# `kcp train`, `kcp export` and `kcp validate` in turn, as the command line runs them, in one fresh
# process: TensorFlow's GCS filesystem reads the environment when TensorFlow starts, and one
# interpreter start (TensorFlow, Keras, Beam: about 8 s on 2 cores) instead of three saves ~16 s.
STAGES = r"""
import sys
from kcp import cli
run_dir, settings = sys.argv[1], sys.argv[2:]
for stage in (["train", "--run-dir", run_dir, *settings], ["export", "--run-dir", run_dir],
              ["validate", "--run-dir", run_dir]):
    print(f"=== kcp {stage[0]}", flush=True)
    code = cli.main(stage)
    sys.stdout.flush()
    if code != 0:
        sys.exit(f"kcp {stage[0]} exited with {code}")
"""


def kcp_stages(env, run_dir, *settings):
    """{stage: its stdout} of train, export and validate on `run_dir`, each of which must succeed."""
    result = subprocess.run([sys.executable, "-c", STAGES, run_dir, *settings], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    parts = result.stdout.split("=== kcp ")[1:]
    outputs = {part.split("\n", 1)[0]: part.split("\n", 1)[1] if "\n" in part else "" for part in parts}
    assert list(outputs) == ["train", "export", "validate"], result.stdout[-2000:]
    return outputs


def test_train_export_and_validate_with_the_run_directory_on_gcs(gcs, gcs_emulator, google_apis, digits_data,
                                                                   tmp_path):
    bucket = gcs.bucket("kcp-test")
    data = os.path.join(digits_data, "data")
    for root, _, files in os.walk(data):
        for name in files:
            path = os.path.join(root, name)
            bucket.blob(f"{RUN}/data/{os.path.relpath(path, data)}").upload_from_filename(path)
    env = {**os.environ, **gcs_emulator.environment(), **google_apis.environment(), "TF_CPP_MIN_LOG_LEVEL": "2"}
    run_dir = f"gs://kcp-test/{RUN}"
    assert "blessed" in kcp_stages(env, run_dir, *SETTINGS)["validate"]

    local = fresh_run(digits_data, tmp_path)
    assert cli.main(["train", "--run-dir", local, *SETTINGS]) == 0
    on_gcs = json.loads(bucket.blob(f"{RUN}/train/metrics.json").download_as_bytes())
    here = json.load(open(os.path.join(local, "train", "metrics.json")))
    assert on_gcs["weights_sha256"] == here["weights_sha256"]  # the same training, wherever the files are
    assert on_gcs["test"]["accuracy"] == here["test"]["accuracy"] > 0.5
    assert len(json.loads(bucket.blob(f"{RUN}/train/history.json").download_as_bytes())["loss"]) == 3

    names = {blob.name for blob in gcs.list_blobs("kcp-test", prefix=f"{RUN}/")}
    for expected in ("train/model.keras", "train/checkpoints/best.weights.h5", "train/confusion_matrix.json",
                     "export/model/1/saved_model.pb", "export/model/1/variables/variables.index",
                     "export/model/1/assets.extra/labels.txt", "export/model/1/assets.extra/validation.json"):
        assert f"{RUN}/{expected}" in names
    assert [n for n in names if "/train/logs/train/events.out.tfevents." in n]
    assert not [n for n in names if "/train/backup/" in n or ".tmp-" in n]  # a finished run leaves no backup
    validation = json.loads(bucket.blob(f"{RUN}/export/model/1/assets.extra/validation.json").download_as_bytes())
    assert validation["blessed"] is True

    # ...and those came through TensorFlow's client: its reads go to storage.googleapis.com, its
    # writes are resumable uploads to www.googleapis.com (Beam's gcsio goes to the emulator directly).
    seen = [(host, method, unquote(path)) for host, method, path in google_apis.requests]
    assert any(host == "storage.googleapis.com" and method == "GET" and f"/{RUN}/data/train-" in path
               for host, method, path in seen)
    uploaded = {path.split("name=")[1].split("&")[0] for host, method, path in seen
                if host == "www.googleapis.com" and method == "POST" and "/upload/" in path}
    # Keras saves model.keras under a unique temporary name first (renamed once whole)
    assert f"{RUN}/export/model/1/saved_model.pb" in uploaded
    assert [n for n in uploaded if n.startswith(f"{RUN}/train/model.tmp-") and n.endswith(".keras")]
    assert {f"{RUN}/train/backup/epoch{epoch:05d}-batch000000.weights.h5" for epoch in (1, 2, 3)} <= uploaded
